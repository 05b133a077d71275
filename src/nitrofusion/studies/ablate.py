"""`nitrofusion ablate`: the paper's ablation (docs/method.md §6), measured on the mini world with seeds.

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

from .. import config as config_lib
from ..data.real_data import training_source
from ..distill_config import DistillConfig
from ..io import atomic_write_json, atomic_write_text
from ..training import checkpoint as ckpt
from ..training import distill
from ..worlds import world_of_config
from ..worlds.mini.evaluation import MiniEvaluation
from ..worlds.mini.generate import load_mini_student
from ..worlds.mini.metrics import MiniMetrics
from ..worlds.mini.pairsets import held_out_pairs, training_pairs
from ..worlds.mini.probe import OverfittingProbe
from .variants import PAPER, VARIANTS, ablation_configs

METRICS = ("fid", "fid_to_teacher", "accuracy", "precision", "recall", "coverage")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def run_ablation(out: Path, seeds: int = 3, budget_images: int = 6400, eval_samples: int = 1000,
                 seed_start: int = 0,
                 variants: list[str] | None = None, overrides: list[str] | None = None,
                 steps: list[int] | None = None, progress: bool = True, log=print, probe_every: int = 0) -> dict:
    variants = variants or list(PAPER)
    steps = sorted(set(steps or [1]))
    seed_range = range(seed_start, seed_start + seeds)  # a slice of the seeds: split one study over processes
    configs = ablation_configs(variants, seeds, seed_start, budget_images, eval_samples, overrides, steps,
                               probe_every)
    started = time.time()
    base = config_lib.build(DistillConfig, "distill", "mini", overrides)
    world = world_of_config(base)
    adapter = world.adapter(base)
    cached: list = []

    def teacher_pairs():  # made once, and only if some variant judges against teacher samples
        if not cached:
            cached.append(training_pairs(base, adapter, progress=progress))
        return cached[0]

    eval_pairs = held_out_pairs(adapter, eval_samples, base.pairs, progress=progress)
    metrics = MiniMetrics()
    init = initial_scores(adapter, eval_pairs, metrics, steps)
    runs = []
    for variant in variants:
        for seed in seed_range:
            cfg = configs[variant, seed]
            run_dir = out / "runs" / f"{variant}-seed{seed}"
            done = run_dir / "result.json"
            entry = json.loads(done.read_text()) if done.exists() else None
            student = None
            if entry is None:
                resume = ckpt.latest(run_dir) is not None
                log(f"{variant} seed {seed}: {'resuming' if resume else 'training'} ({budget_images} images)")
                data = training_source(cfg, teacher_pairs, lambda cfg=cfg: world.real_pairs(cfg, adapter, progress))
                probe = OverfittingProbe(MiniEvaluation(adapter, eval_pairs, metrics, cfg.adversarial.shift),
                                         teacher_pairs()) if probe_every else None
                result = distill(cfg, adapter, data, run_dir, resume=resume, progress=progress, probe=probe)
                student = result["student"]
                entry = {"variant": variant, "seed": seed, "images": result["images"],
                         "train_seconds": result["seconds"]}
                if probe_every:
                    entry["probe"] = probe_curve(run_dir)
            by_steps = entry.setdefault("by_steps", {})
            missing = [s for s in steps if str(s) not in by_steps or "precision" not in by_steps[str(s)]]
            if not missing:
                log(f"{variant} seed {seed}: done before, skipped")
            else:
                if student is None:  # finished earlier: score the saved student at the steps asked for now
                    student = load_mini_student(run_dir)[1]
                evaluation = MiniEvaluation(adapter, eval_pairs, metrics, cfg.adversarial.shift, seed=0)
                for s in missing:
                    by_steps[str(s)] = evaluation.score(evaluation.student_images(student, s), to_teacher=True)
                    log(f"{variant} seed {seed}, {s} step(s): classifier-FID {by_steps[str(s)]['fid']:.2f}, "
                        f"precision {by_steps[str(s)]['precision']:.3f}, recall {by_steps[str(s)]['recall']:.3f}")
                entry.update({m: v for m, v in by_steps[min(by_steps, key=int)].items() if m in METRICS})
                atomic_write_json(done, entry)
            runs.append(entry)
    summary = {str(s): summarise([{"variant": r["variant"], "seed": r["seed"], **r["by_steps"][str(s)]}
                                  for r in runs], variants) for s in steps}
    report = {"budget_images": budget_images, "seeds": seeds, "eval_samples": eval_samples,
              "steps": steps, "metric": "classifier-FID (project Fashion-MNIST classifier, not Inception)",
              "variants": {v: VARIANTS[v][2] for v in variants}, "summary": summary, "runs": runs,
              "seconds": round(time.time() - started, 1)}
    if init is not None:
        report["init"] = init
    if any("probe" in r for r in runs):
        report["probe"] = summarise_probe(runs, variants)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ablation.json", report)
    atomic_write_text(out / "ablation.md", render(report))
    plot(report, out / "ablation.png")
    if "probe" in report:
        plot_probe(report, out / "probe.png")
    return report


def initial_scores(adapter, eval_pairs, metrics: MiniMetrics, steps: list[int]) -> dict | None:
    """A few-step teacher is also every run's initial student: its own scores at each step count, the row a
    fine-tuning must beat (None for a multi-step teacher, whose student starts as a network that cannot sample)."""
    if adapter.sampler.name != "student":
        return None
    evaluation = MiniEvaluation(adapter, eval_pairs, metrics, adapter.sampler.shift, seed=0)
    return {str(s): evaluation.score(evaluation.student_images(adapter.teacher_unet, s), to_teacher=True)
            for s in steps}


def probe_curve(run_dir: Path) -> list[dict]:
    """The probe's entries of a run's log (images seen, then method/probe.py's numbers)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [{"images": e["images"], **e["probe"]} for e in map(json.loads, lines) if "probe" in e]


PROBE_METRICS = ("real_trained_on", "real_held_out", "overfit_gap", "fake", "outside_manifold")


def summarise_probe(runs: list[dict], variants: list[str]) -> dict:
    """Per variant and probe point (images seen): mean and std over seeds of each probe number."""
    out: dict = {}
    for v in variants:
        curves = [r["probe"] for r in runs if r["variant"] == v and r.get("probe")]
        if not curves:
            continue
        points = sorted(set.intersection(*[{p["images"] for p in c} for c in curves]))
        out[v] = []
        for images in points:
            rows = [next(p for p in c if p["images"] == images) for c in curves]
            out[v].append({"images": images, "n": len(rows), **{
                m: dict(zip(("mean", "std"), _mean_std([row[m] for row in rows]), strict=True))
                for m in PROBE_METRICS}})
    return out


def summarise(runs: list[dict], variants: list[str]) -> dict:
    """Mean and sample std per variant and metric, and each variant's difference from the reference (`full`
    when present, else the first variant) in units of the pooled seed std (a difference next to seed noise)."""
    out: dict = {}
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        out[v] = {"n": len(rows)}
        for m in METRICS:
            if rows and all(m in r for r in rows):
                mean, sd = _mean_std([r[m] for r in rows])
                out[v][m] = {"mean": mean, "std": sd}
    ref = "full" if "full" in out else variants[0]
    for v in variants:
        for m in METRICS:
            if m not in out[v] or m not in out[ref]:
                continue
            a, b = out[ref][m], out[v][m]
            pooled = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)
            out[v][m]["delta_vs_full"] = b["mean"] - a["mean"]
            out[v][m]["delta_in_seed_std"] = (b["mean"] - a["mean"]) / pooled if pooled > 0 else None
    return out


COLUMNS = (("fid", "classifier-FID to real", ".2f"), ("fid_to_teacher", "classifier-FID to teacher", ".2f"),
           ("accuracy", "prompt accuracy", ".3f"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"),
           ("coverage", "coverage", ".3f"))


def render(r: dict) -> str:
    lines = [f"# Ablation (mini world, {r['seeds']} seeds, {r['budget_images']} training images each)", "",
             f"{r['eval_samples']} held-out prompts and x_T; {r['metric']}; precision / recall / coverage: k-NN "
             "manifolds (k=3) in the same classifier's features. Mean +- std over seeds; delta = difference from "
             "the reference (first row), in units of the pooled seed std.", ""]
    for steps, summary in r["summary"].items():
        lines += [f"## {steps} step(s)", "",
                  "| variant | " + " | ".join(f"{title} | delta" for _, title, _ in COLUMNS) + " |",
                  "|---|" + "---|---|" * len(COLUMNS)]
        ref = "full" if "full" in summary else next(iter(summary))
        for v, s in summary.items():
            cells = []
            for m, _, fmt in COLUMNS:
                x = s.get(m)
                if x is None:
                    cells += ["-", "-"]
                    continue
                cells.append(f"{x['mean']:{fmt}} +- {x['std']:{fmt}}")
                d = x.get("delta_in_seed_std")
                cells.append("-" if v == ref or d is None else f"{x['delta_vs_full']:+{fmt}} ({d:+.1f} sd)")
            lines.append(f"| {v}: {r['variants'][v]} | " + " | ".join(cells) + " |")
        init = r.get("init", {}).get(steps)
        if init:  # one network, no seeds: the few-step teacher every run starts from
            cells = [c for m, _, fmt in COLUMNS for c in (f"{init[m]:{fmt}}" if m in init else "-", "-")]
            lines.append("| initial student (the few-step teacher's UNet, before fine-tuning) | " + " | ".join(cells)
                         + " |")
        lines.append("")
    lines += ["![ablation](ablation.png)", ""]
    if r.get("probe"):
        lines += render_probe(r["probe"])
    return "\n".join(lines)


PROBE_TITLES = {"real_trained_on": "training pairs called real",
                "real_held_out": "held-out teacher samples called real",
                "overfit_gap": "gap (overfitting)", "fake": "student samples called fake",
                "outside_manifold": "student outside the real manifold (1 - precision)"}


def render_probe(probe: dict) -> list[str]:
    lines = ["## The overfitting probe", "",
             "The heads as a classifier (D > 0: real), over training: mean +- std over seeds (method/probe.py).", "",
             "| variant | images | " + " | ".join(PROBE_TITLES.values()) + " |",
             "|---|---|" + "---|" * len(PROBE_TITLES)]
    for v, points in probe.items():
        for p in points:
            lines.append(f"| {v} | {p['images']:,} | " + " | ".join(
                f"{p[m]['mean']:.3f} +- {p[m]['std']:.3f}" for m in PROBE_TITLES) + " |")
    return [*lines, "", "![probe](probe.png)", ""]


def plot(r: dict, path: Path) -> None:
    """Bars (mean +- std, every seed a dot) per variant for each step count: FID, FID to teacher, accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step_counts = list(r["summary"])
    names = list(r["summary"][step_counts[0]])
    panels = (("fid", "classifier-FID to real (lower is better)"),
              ("fid_to_teacher", "classifier-FID to teacher (lower is better)"),
              ("accuracy", "prompt accuracy (higher is better)"), ("recall", "recall (higher is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.0))
    width = 0.8 / len(step_counts)
    for ax, (m, title) in zip(axes, panels, strict=True):
        for j, steps in enumerate(step_counts):
            summary = r["summary"][steps]
            xs = [i + (j - (len(step_counts) - 1) / 2) * width for i in range(len(names))]
            means = [summary[v].get(m, {}).get("mean", float("nan")) for v in names]
            stds = [summary[v].get(m, {}).get("std", 0.0) for v in names]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"{steps} step(s)")
            for x, v in zip(xs, names, strict=True):  # every seed as a dot: n=3 is too few to trust a bar alone
                ys = [run["by_steps"][steps][m] for run in r["runs"]
                      if run["variant"] == v and m in run["by_steps"].get(steps, {})]
                ax.scatter([x] * len(ys), ys, color="k", s=6, zorder=3)
            init = r.get("init", {}).get(steps, {})
            if m in init:  # the few-step model every run started from: a dashed line in its step count's colour
                ax.axhline(init[m], color=f"C{j}", ls="--", lw=0.9, label=f"initial, {steps} step(s)")
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"NitroFusion mini world, {r['seeds']} seeds x {r['budget_images']} images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_probe(r: dict, path: Path) -> None:
    """The probe over training, one line per variant (mean, a band of +- std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("overfit_gap", "real_held_out", "fake", "outside_manifold")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.6))
    for ax, m in zip(axes, panels, strict=True):
        for v, points in r["probe"].items():
            xs = [p["images"] for p in points]
            mean = [p[m]["mean"] for p in points]
            sd = [p[m]["std"] for p in points]
            ax.plot(xs, mean, marker="o", ms=3, label=v)
            ax.fill_between(xs, [a - b for a, b in zip(mean, sd, strict=True)],
                            [a + b for a, b in zip(mean, sd, strict=True)], alpha=0.2)
        ax.set_title(PROBE_TITLES[m], fontsize=9)
        ax.set_xlabel("training images")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
