"""How strong are the discriminator heads? Reads the `log.jsonl` of finished ablation runs and prints, per
variant (mean ± sd over seeds), the discriminator loss and the margin d_real - d_fake of each task over
windows of optimiser steps. A pool whose heads are young (refreshed) or rarely trained (many heads per
slot) separates real from fake less, so the student gets a weaker signal (docs/studies/pool.md).

    python scripts/pool_diagnostics.py ablation-out/runs --variants full static no-refresh hps1
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TASKS = ("global_cond", "local_cond", "local_uncond")


def window_means(log: Path, windows: list[tuple[int, int]]) -> list[dict[str, float]]:
    steps = [e for e in map(json.loads, log.read_text().splitlines()) if "loss_d" in e]
    out = []
    for lo, hi in windows:
        seg = [e for e in steps if lo < e["step"] <= hi]
        if not seg:
            out.append({})
            continue
        row = {"loss_d": statistics.fmean(e["loss_d"] for e in seg)}
        for task in TASKS:
            if f"{task}/d_real" in seg[0]:
                row[task] = statistics.fmean(e[f"{task}/d_real"] - e[f"{task}/d_fake"] for e in seg)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="an ablation's runs/ folder (VARIANT-seedN subfolders)")
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--windows", nargs="+", default=["0-100", "180-280", "360-460"],
                    help="step windows LO-HI (steps LO+1..HI)")
    args = ap.parse_args()
    windows = [tuple(int(x) for x in w.split("-")) for w in args.windows]
    print("| variant | steps | loss_d | " + " | ".join(f"{t} margin" for t in TASKS) + " |")
    print("|---|---|---|" + "---|" * len(TASKS))
    for variant in args.variants:
        runs = [window_means(d / "log.jsonl", windows) for d in sorted(args.runs.glob(f"{variant}-seed*"))
                if (d / "result.json").exists()]
        for i, (lo, hi) in enumerate(windows):
            cells = []
            for key in ("loss_d", *TASKS):
                xs = [r[i][key] for r in runs if key in r[i]]
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                cells.append(f"{statistics.fmean(xs):.3f} ± {sd:.3f}" if xs else "-")
            print(f"| {variant} (n={len(runs)}) | {lo + 1}-{hi} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
