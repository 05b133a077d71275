"""A pipeline family's evaluation (`nitrofusion evaluate` of an SDXL, SD 1.x/2.x or SD3 model): the paper's
real-model metrics (CLIP score, FID, FD-CLIP, aesthetic, ImageReward: real_metrics.py) on a prompt file or the
COCO-5k captions."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ...errors import NitroFusionError
from ...evaluation.viz import pil_to_tensor, save_grid
from ...io import atomic_write_json, atomic_write_text
from ...sampling.student import check_step_counts


def evaluate_pipeline(load_pipeline: Callable, model: str, steps: list[int], out: Path, prompts: str = "",
                      coco: str = "", samples: int = 5000, seed: int = 0, metrics_cfg=None, base: str | None = None,
                      shift: int | None = None, batch_size: int = 4, device: str = "cpu", dtype: str | None = None,
                      progress: bool = True) -> dict:
    """Real-model metrics (real_metrics.py) of a student at each step count, on a prompt file or the COCO-5k
    captions (docs/method.md §6); one image per prompt, image i seeded seed + i, no CFG. `load_pipeline`: the
    family's (generate's), called as load_pipeline(model, base=, shift=, device=, dtype=)."""
    from ...data.prompts import open_prompts
    from ...evaluation.real_metrics import (
        RealMetrics,
        RealMetricsConfig,
        evaluate_images,
        load_caption_pairs,
        write_caption_pairs,
    )
    from ...io import disk_errors
    from .pipeline import generate_images

    check_step_counts(steps)
    if bool(prompts) == bool(coco):
        raise NitroFusionError("give exactly one of --prompts FILE or --coco ANNOTATIONS to evaluate a model")
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
    from ...evaluation.real_metrics import METRICS

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
