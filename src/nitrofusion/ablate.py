"""`nitrofusion ablate`: the paper's ablation (SPEC section 6), measured on the mini world with seeds.

Every variant trains for the same number of images from the same teacher pairs and the same student
initialisation, once per seed (seed = student data order, head init, pool sampling, t*, crops and noise),
and is scored at ONE step on the same held-out prompts and x_T. Finished runs are skipped when rerun and
unfinished ones resume from their last checkpoint, so the command can be interrupted at any time.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from . import checkpoint as ckpt
from . import config as config_lib
from .adapters.mini import MiniAdapter
from .distill_config import DistillConfig
from .errors import NitroFusionError
from .io import atomic_write_json, atomic_write_text
from .mini.evaluation import MiniEvaluation
from .mini.metrics import MiniMetrics
from .mini.pairsets import held_out_pairs, training_pairs
from .mini.teacher import load_teacher
from .train import distill

# name -> (distill preset, what it removes)
VARIANTS: dict[str, tuple[str, str]] = {
    "full": ("mini", "full method: 480 heads, 3 task types, dynamic sampling, 1% refresh"),
    "global-only": ("mini-global", "without multi-scale dual-objective heads (global conditional heads only)"),
    "no-refresh": ("mini-norefresh", "without pool refresh"),
    "static": ("mini-static", "without dynamic pool (one fixed head per slot, no refresh)"),
    "single-head": ("mini-singlehead", "single-head baseline (one head on the mid block, shared by all t*)"),
}
METRICS = ("fid", "fid_to_teacher", "accuracy")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def run_ablation(out: Path, seeds: int = 3, budget_images: int = 6400, eval_samples: int = 1000,
                 variants: list[str] | None = None, overrides: list[str] | None = None,
                 progress: bool = True, log=print) -> dict:
    variants = variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise NitroFusionError(f"unknown ablation variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if seeds < 1 or budget_images < 1 or eval_samples < 10:
        raise NitroFusionError("--seeds >= 1, --budget >= 1 image and --eval-samples >= 10 are required")
    started = time.time()
    base = config_lib.build(DistillConfig, "distill", "mini", overrides)
    adapter = MiniAdapter(load_teacher(base.teacher or None))
    pairs = training_pairs(base, adapter, progress=progress)  # every variant inherits the mini pair set
    eval_pairs = held_out_pairs(adapter, eval_samples, base.pairs, progress=progress)
    metrics = MiniMetrics()
    runs = []
    for variant in variants:
        preset = VARIANTS[variant][0]
        for seed in range(seeds):
            run_dir = out / "runs" / f"{variant}-seed{seed}"
            done = run_dir / "result.json"
            if done.exists():
                runs.append(json.loads(done.read_text()))
                log(f"{variant} seed {seed}: done before, skipped")
                continue
            sets = [*(overrides or []), f"max_images={budget_images}", "max_minutes=0", f"seed={seed}",
                    f"pool.seed={seed}", "eval_every=0"]
            cfg = config_lib.build(DistillConfig, "distill", preset, sets)
            resume = ckpt.latest(run_dir) is not None
            log(f"{variant} seed {seed}: {'resuming' if resume else 'training'} ({budget_images} images)")
            result = distill(cfg, adapter, pairs, run_dir, resume=resume, progress=progress)
            evaluation = MiniEvaluation(adapter, eval_pairs, metrics, cfg.adversarial.shift, seed=0)
            score = evaluation.score(evaluation.student_images(result["student"], 1), to_teacher=True)
            entry = {"variant": variant, "seed": seed, "images": result["images"],
                     "train_seconds": result["seconds"], **score}
            atomic_write_json(done, entry)
            runs.append(entry)
            log(f"{variant} seed {seed}: classifier-FID {score['fid']:.2f}, to teacher "
                f"{score['fid_to_teacher']:.2f}, accuracy {score['accuracy']:.3f}")
    summary = summarise(runs, variants)
    report = {"budget_images": budget_images, "seeds": seeds, "eval_samples": eval_samples,
              "steps": 1, "metric": "classifier-FID (project Fashion-MNIST classifier, not Inception)",
              "variants": {v: VARIANTS[v][1] for v in variants}, "summary": summary, "runs": runs,
              "seconds": round(time.time() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ablation.json", report)
    atomic_write_text(out / "ablation.md", render(report))
    plot(report, out / "ablation.png")
    return report


def summarise(runs: list[dict], variants: list[str]) -> dict:
    """Mean and sample std per variant and metric, and each variant's difference from `full` in units
    of the pooled seed std (how large a difference is next to seed noise)."""
    out: dict = {}
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        out[v] = {"n": len(rows)}
        for m in METRICS:
            mean, sd = _mean_std([r[m] for r in rows])
            out[v][m] = {"mean": mean, "std": sd}
    if "full" in out:
        for v in variants:
            for m in METRICS:
                a, b = out["full"][m], out[v][m]
                pooled = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)
                out[v][m]["delta_vs_full"] = b["mean"] - a["mean"]
                out[v][m]["delta_in_seed_std"] = (b["mean"] - a["mean"]) / pooled if pooled > 0 else None
    return out


def render(r: dict) -> str:
    lines = [f"# Ablation (mini world, 1 step, {r['seeds']} seeds, {r['budget_images']} training images each)",
             "", f"{r['eval_samples']} held-out prompts and x_T; {r['metric']}. Mean +- std over seeds; "
             "delta = difference from the full method, in units of the pooled seed std.", "",
             "| variant | classifier-FID to real | delta | classifier-FID to teacher | delta | prompt accuracy "
             "| delta |",
             "|---|---|---|---|---|---|---|"]
    for v, s in r["summary"].items():
        cells = []
        for m, fmt in (("fid", ".2f"), ("fid_to_teacher", ".2f"), ("accuracy", ".3f")):
            x = s[m]
            cells.append(f"{x['mean']:{fmt}} +- {x['std']:{fmt}}")
            d = x.get("delta_in_seed_std")
            cells.append("-" if v == "full" or d is None else f"{x['delta_vs_full']:+{fmt}} ({d:+.1f} sd)")
        lines.append(f"| {v}: {r['variants'][v]} | " + " | ".join(cells) + " |")
    lines += ["", "![ablation](ablation.png)", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["summary"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (m, title) in zip(axes, (("fid", "classifier-FID to real (lower is better)"),
                                     ("fid_to_teacher", "classifier-FID to teacher (lower is better)"),
                                     ("accuracy", "prompt accuracy (higher is better)")), strict=True):
        means = [r["summary"][v][m]["mean"] for v in names]
        stds = [r["summary"][v][m]["std"] for v in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=["#3a7" if v == "full" else "#889"
                                                                     for v in names])
        for i, v in enumerate(names):  # every seed as a dot: n=3 is too few to trust a bar alone
            ys = [x[m] for x in r["runs"] if x["variant"] == v]
            ax.scatter([i] * len(ys), ys, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"NitroFusion ablation, mini world, 1 step, {r['seeds']} seeds x {r['budget_images']} images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
