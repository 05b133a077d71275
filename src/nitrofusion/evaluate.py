"""`nitrofusion evaluate`: fixed-seed quality of a student (or the teacher) at chosen step counts.

Mini world: classifier-FID to the real test set, classifier-FID to the teacher's own samples from the
same x_T and prompts, and prompt accuracy, on the held-out teacher-pair set the demo uses. Real-model
metrics (CLIP score, Inception-FID, aesthetic, ImageReward) come with the SDXL adapter.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from .adapters.mini import MiniAdapter
from .distill_config import PairsConfig
from .errors import NitroFusionError
from .generate import load_mini_student
from .io import atomic_write_json, atomic_write_text
from .mini.evaluation import MiniEvaluation, labels_for, per_class
from .mini.metrics import MiniMetrics
from .mini.pairsets import held_out_pairs
from .mini.teacher import load_teacher
from .viz import pil_to_tensor, save_grid


def evaluate_mini(model: str, steps: list[int], out: Path, samples: int = 2000, seed: int = 0,
                  teacher: str | None = None, progress: bool = True) -> dict:
    if any(not 1 <= s <= 4 for s in steps):
        raise NitroFusionError(f"--steps takes values from 1 to 4 (got {steps})")
    if samples < 10:
        raise NitroFusionError("--samples must be at least 10")
    if model != "teacher":
        from .generate import student_folder

        student_folder(Path(model))  # a wrong path fails now, not after the held-out pairs are made
    started = time.time()
    adapter = MiniAdapter(load_teacher(teacher))
    pairs = held_out_pairs(adapter, samples, PairsConfig(seed=seed), progress)
    metrics = MiniMetrics()
    results: dict = {"model": model, "samples": samples, "seed": seed, "metric": "classifier-FID (project "
                     "Fashion-MNIST classifier features, not Inception)", "rows": []}
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
        _, unet, shift = load_mini_student(Path(model))
        evaluation = MiniEvaluation(adapter, pairs, metrics, shift=shift, seed=seed)
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
    lines = [f"# Evaluation of {r['model']}", "",
             f"{r['samples']} held-out prompts and x_T (seed {r['seed']}); {r['metric']}.", "",
             "| model | steps | classifier-FID to real | classifier-FID to teacher | prompt accuracy | precision | "
             "recall | coverage | coverage per class (min / max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        per = [c for c in row["class_coverage"] if c is not None]
        lines.append(f"| {row['model']} | {row['steps']} | {row['fid']:.2f} | {row['fid_to_teacher']:.2f} | "
                     f"{row['accuracy']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} | {row['coverage']:.3f} | "
                     f"{min(per):.3f} / {max(per):.3f} |")
    lines += ["", "Precision / recall (Kynkaanniemi et al. 2019) and coverage (Naeem et al. 2020): k-NN manifolds, "
              "k=3, in the classifier's features, against as many real test images; per class: the real images of a "
              "class covered by the samples prompted with it.", "", "![samples](grid.png)", ""]
    return "\n".join(lines)


def evaluate_sdxl(model: str, steps: list[int], out: Path, prompts: str = "", coco: str = "", samples: int = 5000,
                  seed: int = 0, metrics_cfg=None, base: str | None = None, shift: int | None = None,
                  batch_size: int = 4, device: str = "cpu", dtype: str | None = None, progress: bool = True) -> dict:
    """Real-model metrics (real_metrics.py) of an SDXL student at each step count, on a prompt file or the
    COCO-5k captions (docs/method.md §6); one image per prompt, image i seeded seed + i, no CFG."""
    from .data.prompts import open_prompts
    from .io import disk_errors
    from .pipeline import generate_images, load_pipeline
    from .real_metrics import RealMetrics, RealMetricsConfig, evaluate_images, load_caption_pairs, write_caption_pairs

    if any(not 1 <= s <= 4 for s in steps):
        raise NitroFusionError(f"--steps takes values from 1 to 4 (got {steps})")
    if bool(prompts) == bool(coco):
        raise NitroFusionError("give exactly one of --prompts FILE or --coco ANNOTATIONS for an SDXL model")
    started = time.time()
    cfg = metrics_cfg or RealMetricsConfig()
    if coco:
        pairs = load_caption_pairs(coco, samples, seed)[:samples]  # a TSV is a published set: its first n
        texts = [c for c, _ in pairs]
        if cfg.reference:
            cfg.reference_files = [f for _, f in pairs]
    else:
        source = open_prompts(prompts)
        texts = source.take(0, min(samples, source.count()))
    metrics = RealMetrics(cfg)
    metrics.prepare_reference()  # a bad reference image fails before any generation
    pipe = load_pipeline(model, base=base, shift=shift, device=device, dtype=dtype)
    results: dict = {"model": model, "samples": len(texts), "seed": seed, "source": coco or prompts, "rows": []}
    grid_rows, labels = [], []
    with disk_errors("evaluation results", out, fix="then rerun"):
        out.mkdir(parents=True, exist_ok=True)
        if coco:
            write_caption_pairs(pairs, out / "captions.tsv")  # the exact caption set, to publish with the numbers
    for s in tqdm(steps, desc="evaluate", unit="setting", disable=not progress):
        first: list = []

        def batches(s=s, first=first):
            for i in range(0, len(texts), batch_size):
                images = generate_images(pipe, texts[i:i + batch_size], s, seed=seed + i, batch_size=batch_size)
                if len(first) < 8:
                    first.extend(images[:8 - len(first)])
                yield images

        row = {"steps": s, **evaluate_images(batches(), texts, metrics=metrics)}
        results["rows"].append(row)
        grid_rows.append(pil_to_tensor(first))
        labels.append(f"{s} step(s)")
    results["seconds"] = round(time.time() - started, 1)
    with disk_errors("evaluation results", out, fix="then rerun"):
        save_grid(out / "grid.png", grid_rows, labels, scale=1)
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", render_real(results))
    return results


def render_real(r: dict) -> str:
    from .real_metrics import METRICS

    names = {"clip_score": "CLIP score (raw cosine)", "fid": "FID (Inception)", "fd_clip": "FD-CLIP (not FID)",
             "aesthetic": "LAION aesthetic", "image_reward": "ImageReward"}
    lines = [f"# Evaluation of {r['model']}", "", f"{r['samples']} prompts from {r['source']}, image i seeded "
             f"{r['seed']} + i, no CFG.", "", "| steps | " + " | ".join(names[m] for m in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    skipped: dict[str, str] = {}
    for row in r["rows"]:
        cells = []
        for m in METRICS:
            v = row[m]
            if "value" in v:
                cells.append(f"{v['value']:.4g}")
            else:
                cells.append("skipped")
                skipped[m] = v["skipped"]
        lines.append(f"| {row['steps']} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {names[m]} skipped: {why}" for m, why in skipped.items()] + ["", "![samples](grid.png)", ""]
    return "\n".join(lines)
