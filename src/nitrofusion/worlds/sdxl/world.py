"""SDXL (and SDXL-layout models): the diffusers pipeline family NitroFusion was published on
(docs/method.md §1-5)."""

from __future__ import annotations

import json
from pathlib import Path

from ...data.pairs import Prompts
from ...distill_config import DistillConfig
from ...errors import NitroFusionError
from ..adapter import ModelAdapter
from ..base import GenerateOptions, LiveGenerator, World

EXAMPLES = ["a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk"]


class SDXLWorld(World):
    name = "sdxl"
    export_formats = ("diffusers", "single-file", "lora")
    supported_options = ("--base", "--shift", "--height", "--width", "--dtype", "--fast", "--vae", "--vae-dtype")
    examples = EXAMPLES

    def adapter(self, cfg: DistillConfig) -> ModelAdapter:
        from .adapter import SDXLAdapter

        if not cfg.teacher:
            raise NitroFusionError("world 'sdxl' needs a teacher: --teacher DIR (a diffusers SDXL pipeline folder)")
        return SDXLAdapter(cfg.teacher, cfg.sdxl)

    def prompts(self, cfg: DistillConfig, verbose: bool = True) -> Prompts:
        from ...data.prompts import open_prompts

        if not cfg.prompts.source:
            raise NitroFusionError(f"world '{self.name}' needs prompts: --prompts FILE (.txt, .csv, .jsonl, a datasets "
                                   "folder or hf:NAME)")
        source = open_prompts(cfg.prompts.source, cfg.prompts.column, cfg.prompts.split, cfg.prompts.max_chars)
        source.count()  # one streamed pass: fails now on an unusable source, and counts what was skipped
        if verbose:
            print(f"prompts: {source.stats.summary()} from {cfg.prompts.source}")
        return source

    def recognises(self, kind: str, path: Path) -> bool:
        if kind == "file":  # a UNet file's family is its --base folder's, checked when it loads
            from ..sd3.pipeline import is_dit_weights

            return not is_dit_weights(path)  # an SD3 transformer's file is the sd3 world's
        if kind == "pipeline":
            return json.loads((path / "model_index.json").read_text()).get("_class_name") == "StableDiffusionXLPipeline"
        file = path / "unet" / "config.json" if kind == "student" else path / "config.json"
        return file.is_file() and json.loads(file.read_text()).get("addition_embed_type") == "text_time"

    def generate_to_folder(self, model: Path, prompts: list[str], steps: int, seed: int, out: Path,
                           options: GenerateOptions) -> list[Path]:
        from .pipeline import generate_to_folder

        o = options
        return generate_to_folder(model, prompts, steps, seed, out, base=o.base, shift=o.shift, height=o.height,
                                  width=o.width, batch_size=o.batch_size, num_per_prompt=o.num_per_prompt,
                                  device=o.device or "cpu", dtype=o.dtype, fast=o.fast, vae=o.vae,
                                  vae_dtype=o.vae_dtype)

    def live_generator(self, model: Path, options: GenerateOptions, size: int | None) -> tuple[LiveGenerator,
                                                                                               list[str]]:
        from .pipeline import generate_images, load_pipeline

        o = options
        pipe = load_pipeline(model, base=o.base, shift=o.shift, device=o.device or "cpu", dtype=o.dtype, fast=o.fast,
                             vae=o.vae, vae_dtype=o.vae_dtype)

        def run(prompt: str, steps: int, seed: int):
            return generate_images(pipe, [prompt], steps, seed, height=size, width=size, batch_size=1)[0]

        return run, self.examples

    def evaluate(self, model: str, steps: list[int], out: Path, options: dict) -> list[str]:
        from ...real_metrics import RealMetricsConfig
        from .evaluate import evaluate_sdxl

        o = {k: v for k, v in options.items() if v is not None}
        cfg = RealMetricsConfig(clip=o.get("clip", ""), inception=o.get("inception", ""),
                                aesthetic=o.get("aesthetic", ""), aesthetic_clip=o.get("aesthetic_clip", ""),
                                image_reward=o.get("image_reward", ""), reference=o.get("reference", ""),
                                device=o.get("device", ""))
        r = evaluate_sdxl(model, steps, out, prompts=o.get("prompts", ""), coco=o.get("coco", ""),
                          samples=o.get("samples") or 5000, seed=o.get("seed", 0), metrics_cfg=cfg,
                          base=o.get("base"), shift=o.get("shift"), batch_size=o.get("batch_size", 4),
                          device=o.get("device") or "cpu", dtype=o.get("dtype"))
        lines = []
        for row in r["rows"]:
            parts = [f"{m} {v['value']:.4g}" if "value" in v else f"{m} skipped ({v['skipped']})"
                     for m, v in row.items() if isinstance(v, dict)]
            lines.append(f"{row['steps']} step(s): " + "; ".join(parts))
        return lines

    def export(self, model: str, fmt: str, out: str, options: dict) -> list[str]:
        from ...dtypes import parse_dtype
        from .export import export

        r = export(model, fmt, out, base=options.get("base"), shift=options.get("shift"), rank=options.get("rank"),
                   dtype=parse_dtype(options.get("dtype")), device=options.get("device"))
        lines = []
        if fmt == "lora" and "source" in r:
            lines.append(f"LoRA rank {r['rank']} (alpha {r['alpha']:g}) on {r['lora_layers']} layers "
                         f"({r['lora_parameters']:,} parameters): {r['source']}")
        elif fmt == "lora":
            lines.append(f"LoRA rank {r['rank']} on {r['lora_layers']} Linear/Conv2d layers ({r['lora_parameters']:,} "
                         f"parameters): relative error of the delta {r['relative_error_total']:.4f} overall, "
                         f"{r['relative_error_covered']:.4f} on those layers; {100 * r['uncovered_fraction']:.2f}% of "
                         "the delta (squared norm) is in norms/biases that LoRA cannot hold")
        elif fmt == "single-file":
            lines.append(f"{r['tensors']} tensors in the original {r['architecture']} layout; round trip through "
                         f"diffusers' converters exact for all {r['round_trip_checked']} tensors; sample with shift "
                         f"{r['shift']}, 1-4 steps, no CFG")
        return lines + [f"exported to {out}"]

    def transfer(self, student: str, base: str, custom: str, out: str, options: dict) -> list[str]:
        from ...dtypes import parse_dtype
        from .export import transfer

        r = transfer(student, base, custom, out, dtype=parse_dtype(options.get("dtype")))
        return [f"custom + (student - base) over {r['tensors']} tensors written to {r['path']}"
                + (f" (sample with shift {r['shift']})" if r["shift"] is not None else "")]

    def bench(self, options: dict) -> tuple[dict, str]:
        """The SDXL-size training iteration with its step profile, or `inference` (stock vs fast generation), or
        `memory` (the memory model of every SDXL preset)."""
        o = options
        if o.get("inference"):
            from ...dtypes import parse_dtype
            from .inference_bench import format_inference, run_inference_bench

            result = run_inference_bench(o["size"], o.get("device"), parse_dtype(o.get("dtype")),
                                         iters=max(o["iters"], 1), warmup=o["warmup"])
            return result, format_inference(result)
        if o.get("memory"):
            from .memory import format_memory, memory_model

            result = memory_model(overrides=o.get("overrides"))
            return result, format_memory(result)
        from ...step_profile import format_profile, profile_step
        from .bench import format_table, run_bench

        result = run_bench(o["size"], o.get("device"), o.get("overrides"), iters=o["iters"], warmup=o["warmup"])
        result["profile"] = profile_step(o["size"], o.get("device"), o.get("overrides"), steps=max(o["iters"], 1),
                                         warmup=o["warmup"])
        return result, format_table(result) + "\n\n" + format_profile(result["profile"])
