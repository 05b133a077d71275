"""`nitrofusion demo`: the whole method on the embedded mini world, with pictures and measured numbers.

shipped teacher -> cached teacher pairs -> NitroFusion distillation (time budget) -> evaluation of the
teacher, the teacher forced to one step, and the student at 1, 2, 3 and 4 steps on the same held-out x_T
and prompts (classifier-FID, accuracy, precision / recall / coverage) -> report.md, report.json, grid,
classifier-FID curve. The budget is counted in images, so every machine trains the same model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import config as config_lib
from . import threads
from .adapters.mini import MiniAdapter
from .distill_config import DistillConfig
from .io import atomic_write_json, atomic_write_text
from .mini.evaluation import MiniEvaluation, per_class
from .mini.metrics import MiniMetrics
from .mini.pairsets import held_out_pairs, training_pairs
from .mini.teacher import load_teacher
from .real_data import training_source
from .train import distill
from .viz import plot_curves, save_grid

STEPS = (1, 2, 3, 4)


def run_demo(out: Path, cfg: DistillConfig, eval_samples: int = 2000, resume: bool = False,
             log=print) -> dict:
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    threads.apply(cfg.threads)  # 0: the automatic rule (threads.py)
    teacher = load_teacher(cfg.teacher or None)
    adapter = MiniAdapter(teacher)
    metrics = MiniMetrics()

    t0 = time.time()
    train_pairs = training_source(cfg, adapter, lambda: training_pairs(cfg, adapter))
    eval_pairs = held_out_pairs(adapter, eval_samples, cfg.pairs)
    pair_seconds = time.time() - t0
    log(f"training data ready ({cfg.real.source}), {len(eval_pairs)} held-out pairs ({pair_seconds:.0f} s)")

    evaluation = MiniEvaluation(adapter, eval_pairs, metrics, cfg.adversarial.shift, seed=cfg.seed)
    if cfg.max_images:
        log(f"training budget: {cfg.max_images:,} images, the same model on any machine; the progress bar "
            "shows the time left")
    if not resume and (out / "run").exists():
        shutil.rmtree(out / "run")  # the demo's own folder: a rerun starts afresh unless --resume
    result = distill(cfg, adapter, train_pairs, out / "run", resume=resume,
                     evaluator=evaluation.curve(cfg.eval_samples))
    student = result["student"]

    t0 = time.time()
    report: dict = {"teacher": evaluation.teacher()}
    one_step = evaluation.teacher_one_step_images()
    report["teacher_one_step"] = evaluation.score(one_step, to_teacher=True)
    report["teacher"].update(fid_to_teacher=0.0)
    images = {}
    report["student"] = {}
    for steps in STEPS:
        images[steps] = evaluation.student_images(student, steps)
        report["student"][str(steps)] = evaluation.score(images[steps], to_teacher=True)
    eval_seconds = time.time() - t0
    report["train"] = {"iterations": result["iterations"], "images": result["images"],
                       "seconds": result["seconds"]}
    report["eval_samples"] = len(eval_pairs)
    report["timing"] = {"teacher_pairs_seconds": round(pair_seconds, 1), "eval_seconds": round(eval_seconds, 1),
                        "total_seconds": round(time.time() - started, 1)}
    report["config"] = config_lib.to_dict(cfg)

    # Pictures: the same prompts and x_T for every row (two per class).
    pick = per_class(evaluation.labels)
    rows = [adapter.decode(eval_pairs.x0[pick]), adapter.decode(one_step[pick])]
    rows += [adapter.decode(images[s][pick]) for s in STEPS]
    labels = [f"teacher {teacher.sampler.steps} st", "teacher 1 st", *(f"student {s} st" for s in STEPS)]
    save_grid(out / "grid.png", rows, labels, scale=4)
    _plot(out, report)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _plot(out: Path, report: dict) -> None:
    log = out / "run" / "log.jsonl"
    xs, ys = [], []
    for line in log.read_text().splitlines() if log.exists() else []:
        e = json.loads(line)
        if "eval" in e:
            xs.append(e["images"])
            ys.append(e["eval"]["fid"])
    if xs:
        plot_curves(out / "fid_curve.png", {"student, 1 step": (xs, ys)}, "training images",
                    "classifier-FID, log scale (eval_samples held-out)",
                    "Mini world: 1-step quality during distillation",
                    {"teacher (multi-step)": report["teacher"]["fid"]})


def _row(name: str, steps, m: dict) -> str:
    return (f"| {name} | {steps} | {m['fid']:.2f} | {m.get('fid_to_teacher', 0):.2f} | {m['accuracy']:.3f} | "
            f"{m['precision']:.3f} | {m['recall']:.3f} | {m['coverage']:.3f} |")


def render_markdown(r: dict) -> str:
    t, t1, s = r["teacher"], r["teacher_one_step"], r["student"]
    n = r["eval_samples"]
    lines = [
        "# NitroFusion mini-world demo",
        "",
        f"Teacher: {t['sampler']}. Student: one set of weights, sampled with the shifted LCM scheduler. "
        f"Metrics on {n} held-out prompts and x_T (the same for every row). classifier-FID uses the "
        "project's Fashion-MNIST classifier features (not Inception); accuracy = the classifier agrees "
        "with the prompt's class; precision / recall / coverage: k-NN manifolds (k=3) in the same features "
        "against as many real test images (fidelity / diversity).",
        "",
        "| model | steps | classifier-FID to real | FID to teacher samples | prompt accuracy | precision | recall "
        "| coverage |",
        "|---|---|---|---|---|---|---|---|",
        _row("teacher", t["steps"], t),
        _row("teacher forced to 1 step", 1, t1),
        *(_row("NitroFusion student", k, s[k]) for k in s),
    ]
    tr, tm = r["train"], r["timing"]
    lines += [
        "",
        f"Distillation: {tr['iterations']} optimiser steps, {tr['images']} images, {tr['seconds']:.0f} s. "
        f"Teacher pairs: {tm['teacher_pairs_seconds']:.0f} s (cached after the first run). "
        f"Evaluation: {tm['eval_seconds']:.0f} s. Whole demo: {tm['total_seconds']:.0f} s.",
        "",
        "![teacher vs student](grid.png)",
        "",
        "![classifier-FID during training](fid_curve.png)",
        "",
    ]
    return "\n".join(lines)
