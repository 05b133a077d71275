"""How fast does the CLI answer before any work? Median wall time of 5 runs each of `--help`, `presets` and a
one-line config error (heavy libraries must load only in the commands that need them).

    python scripts/bench_startup.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CASES = {
    "nitrofusion --help": ["--help"],
    "nitrofusion presets": ["presets"],
    "config typo (distill --set pool.widht=3)": ["distill", "--out", "unused-run", "--set", "pool.widht=3"],
    "out-of-range value (demo --set threads=-1)": ["demo", "--set", "threads=-1"],
}


def main() -> None:
    print("| command | median s (5 runs) | exit |\n|---|---|---|")
    for name, argv in CASES.items():
        times, code = [], 0
        for _ in range(5):
            t0 = time.perf_counter()
            code = subprocess.run([sys.executable, "-m", "nitrofusion", *argv], capture_output=True).returncode
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(times):.2f} | {code} |")


if __name__ == "__main__":
    main()
