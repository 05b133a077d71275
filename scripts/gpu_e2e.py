"""The first real end-to-end run, as a user runs it: `sdxl-realism-lora` as shipped (bf16, its micro-batch, 1024 px)
on a full-size random-weight SDXL folder (fp16 on disk), through `accelerate launch`, killed with SIGKILL after its
first checkpoint and resumed (real processes), exported in every format, and sampled in 1 and 4 steps (`--fast` on
CUDA; these last through the CLI entry point in this process).

    python scripts/gpu_e2e.py --out /tmp/e2e                 # on a GPU (scripts/gpu_bench.sh calls it)
    python scripts/gpu_e2e.py --size tiny --out /tmp/e2e     # on a CPU: the same steps on a tiny pipeline (tests)

Only sizes and budgets are overridden: grad_accum 2 (4 images per optimiser step instead of 100), a checkpoint
every step, 3 steps in all, and at --size tiny the resolution (64 px). It prints and writes (OUT/e2e.md,
OUT/e2e.json) one row per stage with its seconds, the training images/s, the measured peak GPU memory beside the
memory model's prediction (`nitrofusion bench --memory`), and exits 1 if any stage fails. Random weights: the
images mean nothing; what is measured is that every stage runs, how fast, and in how much memory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PRESET = "sdxl-realism-lora"
STEPS = 3  # optimiser steps in all: the first before the kill, the rest after the resume
PROMPTS = ["a photo of a red fox in the snow", "an astronaut riding a horse on the moon",
           "a bowl of ramen, studio lighting", "a lighthouse at dusk, oil painting"]


def launch(*argv: str, cpu: bool) -> list[str]:
    """`accelerate launch -m nitrofusion ...` for one process, every launcher value given (no config-file warning)."""
    cpu_flags = ["--cpu", "--num_cpu_threads_per_process", "1"] if cpu else []  # 1: the tests share 2 cores
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "bf16", "--dynamo_backend", "no", *cpu_flags, "-m", "nitrofusion", *argv]


def kill_after_first_checkpoint(cmd: list[str], run: Path, log, timeout: float) -> float:
    """Start the run, SIGKILL its whole process group once checkpoints/step-00000001 is in place; the seconds."""
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        first = run / "checkpoints" / "step-00000001"
        while not first.is_dir():  # renamed into place only once complete (checkpoint.py)
            if proc.poll() is not None:
                raise RuntimeError(f"the run exited ({proc.returncode}) before its first checkpoint: see {log}")
            if time.time() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError(f"no checkpoint after {timeout:.0f} s: see {log}")
            time.sleep(0.05)
        if proc.poll() is not None:
            raise RuntimeError(f"the run finished before the kill could land: see {log}")
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the training process
        proc.wait()
    return time.time() - start


def run_stage(cmd: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"exit {done.returncode}: {tail[0][:300]} (see {log})")
    return time.time() - start


def run_command(argv: list[str], log: Path) -> float:
    """A `nitrofusion` command in this process (the CLI's own entry point, without a second interpreter's imports)."""
    import contextlib

    from nitrofusion.cli import main as nitrofusion

    start = time.time()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        code = nitrofusion(argv)
    if code:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"exit {code}: {tail[0][:300]} (see {log})")
    return time.time() - start


def predicted_peak_gib(overrides: list[str]) -> float:
    from nitrofusion.worlds.sdxl.memory import GiB, memory_model

    return memory_model((PRESET,), overrides)["rows"][0]["total"] / GiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--out", required=True, help="work folder (teacher, run, exports, logs, e2e.md)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the first leg may take to checkpoint")
    args = parser.parse_args()
    from nitrofusion.quiet import quiet_dependencies

    quiet_dependencies()  # this process imports diffusers too (the random folder, the memory model)
    import torch

    from nitrofusion.worlds.sdxl.testing import build_random_sdxl

    cuda = torch.cuda.is_available()
    if args.size == "full" and not cuda:
        print("gpu_e2e: --size full needs a CUDA GPU (a 2.6B-parameter UNet at 1024 px); use --size tiny on a CPU",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NITROFUSION_CACHE", str(out / "cache"))
    teacher, run, logs = out / "teacher", out / "run", out / "logs"
    logs.mkdir(exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    sizes = [] if args.size == "full" else ["sdxl.resolution=64"]
    budget = ["grad_accum=2", "checkpoint_every_images=4", "pairs.shard_size=4"]  # 4 images per optimiser step
    sets = [a for kv in sizes + budget for a in ("--set", kv)]
    rows: list[dict] = []

    def stage(name: str, fn) -> bool:
        try:
            seconds = fn()
            rows.append({"stage": name, "ok": True, "seconds": round(seconds, 1)})
        except Exception as e:  # noqa: BLE001 - a failed stage is a row of the report, and the exit code
            rows.append({"stage": name, "ok": False, "error": str(e)})
        print(f"{name}: {'ok' if rows[-1]['ok'] else 'FAILED ' + rows[-1]['error']}", flush=True)
        return rows[-1]["ok"]

    def build() -> float:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # no "Writing model shards" bars on the report
        start = time.time()
        if not (teacher / "model_index.json").exists():
            build_random_sdxl(teacher, args.size, dtype=torch.float16 if args.size == "full" else None)
        return time.time() - start

    images = 4 * STEPS
    first = launch("distill", "--preset", PRESET, "--teacher", str(teacher), "--prompts", str(out / "prompts.txt"),
                   "--out", str(run), *sets, "--set", f"max_images={images}", cpu=not cuda)
    resume = launch("distill", "--resume", "--out", str(run), cpu=not cuda)
    ok = stage("random-weight SDXL folder", build)
    ok = ok and stage("distill, SIGKILL after the first checkpoint",
                      lambda: kill_after_first_checkpoint(first, run, logs / "distill.log", args.timeout))
    ok = ok and stage(f"distill --resume to {STEPS} steps", lambda: run_stage(resume, logs / "resume.log"))
    for fmt, dest in (("diffusers", out / "export-diffusers"), ("single-file", out / "student.safetensors"),
                      ("lora", out / "export-lora")):
        ok = stage(f"export --format {fmt}", lambda fmt=fmt, dest=dest: run_command(
            ["export", str(run), "--format", fmt, "--out", str(dest)], logs / f"export-{fmt}.log")) and ok
    fast = ["--fast"] if cuda else []  # --fast is the CUDA path (compiled regions, CUDA graphs)
    for steps in ("1", "4"):
        ok = stage(f"generate --steps {steps}{' --fast' if cuda else ''}", lambda steps=steps: run_command(
            ["generate", "--model", str(run), "--prompt", PROMPTS[0], "--steps", steps, *fast,
             "--out", str(out / f"generate-{steps}")], logs / f"generate-{steps}.log")) and ok

    entries = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] \
        if (run / "log.jsonl").exists() else []
    steps_logged = [e["step"] for e in entries]
    if steps_logged != list(range(1, STEPS + 1)):
        ok = False
        rows.append({"stage": "training log", "ok": False, "error": f"steps {steps_logged}, not 1..{STEPS}"})
    rates = [e["images_per_second"] for e in entries[1:]]  # the first step of a run includes warm-up
    measured = max((e.get("peak_memory_gib", 0.0) for e in entries), default=0.0)
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "size": args.size, "preset": PRESET,
        "overrides": sizes + budget, "steps": STEPS, "images": images, "ok": ok, "stages": rows,
        "images_per_second": round(sum(rates) / len(rates), 3) if rates else None,
        "peak_memory_gib": measured if cuda else None,
        "predicted_peak_gib": round(predicted_peak_gib(sizes + ["micro_batch=2"]), 2) if args.size == "full" else None,
    }
    lines = [f"# {PRESET} end to end on {summary['device']} ({args.size} random-weight SDXL)", "",
             "| stage | result | seconds |", "|---|---|---:|"]
    lines += [f"| {r['stage']} | {'ok' if r['ok'] else 'FAILED: ' + r['error']} | {r.get('seconds', '')} |"
              for r in rows]
    memory = (f"peak memory {summary['peak_memory_gib']} GiB measured, {summary['predicted_peak_gib']} GiB predicted "
              "by the memory model (a lower bound: no CUDA context or allocator slack)") if args.size == "full" \
        else "peak memory: measured on a GPU at --size full only"
    lines += ["", f"training: {summary['images_per_second']} images/s (steps 2-{STEPS}); {memory}"]
    (out / "e2e.md").write_text("\n".join(lines) + "\n")
    (out / "e2e.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
