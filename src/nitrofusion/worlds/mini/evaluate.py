"""The mini world's evaluation (`nitrofusion evaluate` on a mini model or 'teacher'): classifier-FID to the real
test set and to the teacher's own samples from the same x_T and prompts, prompt accuracy, precision / recall /
coverage, on the held-out teacher-pair set the demo scores on."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tqdm.auto import tqdm

from ...distill_config import PairsConfig
from ...errors import NitroFusionError
from ...evaluation.viz import save_grid
from ...io import atomic_write_json, atomic_write_text
from ...sampling.student import check_step_counts
from .adapter import MiniAdapter
from .evaluation import MiniEvaluation, labels_for, per_class
from .generate import load_mini_student, student_guidance
from .metrics import MiniMetrics
from .pairsets import held_out_pairs
from .teacher import load_teacher


def evaluate_mini(model: str, steps: list[int], out: Path, samples: int = 2000, seed: int = 0,
                  teacher: str | None = None, progress: bool = True, guidance: float | None = None) -> dict:
    """`guidance`: the w both sides sample at: the teacher's CFG scale (its held-out samples are made at it) and a
    guided student's conditioning (docs/method.md §10); None: the teacher's own scale, a guided student's default."""
    check_step_counts(steps)
    if samples < 10:
        raise NitroFusionError("--samples must be at least 10")
    started = time.time()
    if model != "teacher":  # a wrong path, or --guidance for an unguided student, fails before any model loads
        guidance = student_guidance(Path(model), guidance)
        _, unet, shift = load_mini_student(Path(model))
    adapter = MiniAdapter(load_teacher(teacher))
    if guidance is not None:
        adapter.sampler = dataclasses.replace(adapter.sampler, guidance_scale=guidance)
    pairs = held_out_pairs(adapter, samples, PairsConfig(seed=seed), progress)
    metrics = MiniMetrics()
    results: dict = {"model": model, "samples": samples, "seed": seed, "metric": "classifier-FID (project "
                     "Fashion-MNIST classifier features, not Inception)", "guidance": guidance, "rows": []}
    rows, labels = [], []
    pick = per_class(labels_for(pairs.prompts))
    if model == "teacher":
        evaluation = MiniEvaluation(adapter, pairs, metrics, shift=1000, seed=seed)
        row = {"model": "teacher", "steps": adapter.sampler.steps, "sampler": adapter.sampler.describe(),
               **evaluation.score(pairs.x0, to_teacher=True)}
        results["rows"].append(row)
        rows.append(adapter.decode(pairs.x0[pick]))
        labels.append(f"teacher {adapter.sampler.steps} st")
    else:
        evaluation = MiniEvaluation(adapter, pairs, metrics, shift=shift, seed=seed, guidance=guidance)
        for s in tqdm(steps, desc="evaluate", unit="setting", disable=not progress):
            images = evaluation.student_images(unet, s)
            results["rows"].append({"model": "student", "steps": s, **evaluation.score(images, to_teacher=True)})
            rows.append(adapter.decode(images[pick]))
            labels.append(f"{s} step(s)")
    results["seconds"] = round(time.time() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(out / "grid.png", rows, labels, scale=4)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", render(results))
    return results


def render(r: dict) -> str:
    at = f"; sampled at guidance scale {r['guidance']:g}" if r.get("guidance") is not None else ""
    lines = [f"# Evaluation of {r['model']}", "",
             f"{r['samples']} held-out prompts and x_T (seed {r['seed']}); {r['metric']}{at}.", "",
             "| model | steps | classifier-FID to real | classifier-FID to teacher | prompt accuracy | precision | "
             "recall | coverage | coverage per class (min / max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        per = [c for c in row["class_coverage"] if c is not None]  # None: too few samples of a class for k-NN
        span = f"{min(per):.3f} / {max(per):.3f}" if per else "n/a (too few samples per class)"
        lines.append(f"| {row['model']} | {row['steps']} | {row['fid']:.2f} | {row['fid_to_teacher']:.2f} | "
                     f"{row['accuracy']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} | {row['coverage']:.3f} | "
                     f"{span} |")
    lines += ["", "Precision / recall (Kynkaanniemi et al. 2019) and coverage (Naeem et al. 2020): k-NN manifolds, "
              "k=3, in the classifier's features, against as many real test images; per class: the real images of a "
              "class covered by the samples prompted with it.", "", "![samples](grid.png)", ""]
    return "\n".join(lines)
