"""What the diffusers pipeline worlds share: prompts from a streamed source, real images from a captioned folder
(PipelineWorld: SDXL, SD 1.x/2.x, SD3), and the UNet families' inference half (UNetPipelineWorld: SDXL and SD 1.x/2.x
generate, serve, evaluate, export and transfer through worlds/pipelines/pipeline.py, which loads either family's
pipeline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ...data.pairs import Pairs, Prompts
from ...distill_config import DistillConfig
from ...errors import NitroFusionError
from ..base import GenerateOptions, LiveGenerator, ModelPlan, World, unet_plan
from .family import Family, check_pipeline_folder
from .hub import local_model

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ...method.adapter import ModelAdapter


def teacher_folder(cfg: DistillConfig) -> Path:
    """The run's teacher folder: the path it names, or a Hugging Face Hub id's snapshot (hub.py)."""
    return local_model(cfg.teacher, "--teacher")


def teacher_text(cfg: DistillConfig, what: str) -> str:
    """The dry run's line for the teacher: what it is, and where a Hub id's snapshot lies."""
    folder = teacher_folder(cfg)
    return f"{what}, {cfg.teacher}" + (f" ({folder})" if str(folder) != cfg.teacher else "")


class PipelineWorld(World):
    """A diffusers pipeline family: prompts and real images as every such family takes them, and the DiT families'
    generation (SD3, FLUX: their stock pipeline, `load_pipeline`)."""

    examples: list[str] = []

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

    def real_pairs(self, cfg: DistillConfig, adapter: ModelAdapter, progress: bool = True) -> Pairs:
        from ...data.real_data import folder_real_pairs

        return folder_real_pairs(adapter, cfg.real.data, getattr(cfg, self.name).resolution, cfg.real.count,
                                 cfg.real.seed, progress=progress)

    def load_pipeline(self, model: str | Path, **options):
        """The stock pipeline `generate` samples `model` with."""
        raise NotImplementedError

    transferred = "tensors"  # what `transfer` sums, as its report names them

    def transfer_function(self):
        """The family's `transfer(student, base, custom, out, dtype) -> {"path", "tensors", "shift"}`."""
        raise NotImplementedError

    def transfer(self, student: str, base: str, custom: str, out: str, options: dict) -> list[str]:
        from ...dtypes import parse_dtype

        r = self.transfer_function()(student, base, custom, out, dtype=parse_dtype(options.get("dtype")))
        return [f"custom + (student - base) over {r['tensors']} {self.transferred} written to {r['path']}"
                + (f" (sample with shift {r['shift']})" if r["shift"] is not None else "")]

    def generate_to_folder(self, model: Path, prompts: list[str], steps: int, seed: int, out: Path,
                           options: GenerateOptions) -> list[Path]:
        """The DiT families' (SD3, FLUX) `generate`: their stock pipeline with the student's scheduler; the UNet
        families add --fast and --vae (UNetPipelineWorld)."""
        from ...evaluation.viz import save_images
        from ...sampling.student import check_steps
        from .pipeline import generate_images

        check_steps(steps)
        self.check_options(model, options)  # --fast and --vae are the UNet families' (worlds/pipelines/fast.py)
        o = options
        if not prompts:
            raise NitroFusionError("no prompt given: use --prompt TEXT or --prompts FILE")
        pipe = self.load_pipeline(model, base=o.base, shift=o.shift, device=o.device or "cpu", dtype=o.dtype)
        prompts = [p for p in prompts for _ in range(o.num_per_prompt)]
        images = generate_images(pipe, prompts, steps, seed, o.height, o.width, o.batch_size)
        return save_images(images, prompts, Path(out), steps, seed, o.num_per_prompt)

    def live_generator(self, model: Path, options: GenerateOptions, size: int | None) -> tuple[LiveGenerator,
                                                                                               list[str]]:
        from .pipeline import generate_images

        self.check_options(model, options)
        o = options
        pipe = self.load_pipeline(model, base=o.base, shift=o.shift, device=o.device or "cpu", dtype=o.dtype)

        def run(prompt: str, steps: int, seed: int):
            return generate_images(pipe, [prompt], steps, seed, height=size, width=size, batch_size=1)[0]

        return run, self.examples

    def evaluate(self, model: str, steps: list[int], out: Path, options: dict) -> list[str]:
        """The paper's real-model metrics of `model` at each step count (worlds/pipelines/evaluate.py)."""
        from ...evaluation.real_metrics import RealMetricsConfig
        from .evaluate import evaluate_pipeline

        o = {k: v for k, v in options.items() if v is not None}
        cfg = RealMetricsConfig(clip=o.get("clip", ""), inception=o.get("inception", ""),
                                aesthetic=o.get("aesthetic", ""), aesthetic_clip=o.get("aesthetic_clip", ""),
                                image_reward=o.get("image_reward", ""), reference=o.get("reference", ""),
                                device=o.get("device", ""))
        r = evaluate_pipeline(self.load_pipeline, model, steps, out, prompts=o.get("prompts", ""),
                              coco=o.get("coco", ""), samples=o.get("samples") or 5000, seed=o.get("seed", 0),
                              metrics_cfg=cfg, base=o.get("base"), shift=o.get("shift"),
                              batch_size=o.get("batch_size", 4), device=o.get("device") or "cpu", dtype=o.get("dtype"))
        lines = []
        for row in r["rows"]:
            parts = [f"{m} {v['value']:.4g}" if "value" in v else f"{m} skipped ({v['skipped']})"
                     for m, v in row.items() if isinstance(v, dict)]
            lines.append(f"{row['steps']} step(s): " + "; ".join(parts))
        return lines


def class_of(config: Path) -> str | None:
    """The `_class_name` a diffusers config.json or model_index.json names, or None without one."""
    return json.loads(config.read_text()).get("_class_name") if config.is_file() else None


class DiTPipelineWorld(PipelineWorld):
    """SD3 and FLUX: a transformer in a diffusers pipeline. What they share beyond PipelineWorld: which models they
    recognise, and the run's plan from the teacher's transformer config on the meta device."""

    family: Family
    transformer_class: str  # diffusers' class, e.g. "FluxTransformer2DModel"
    examples = ["a photo of a red fox in the snow", "a poster that says 'one step' in bold letters"]
    transferred = "transformer tensors"

    bench_label: str  # the architecture `bench` builds, as its refusal names it ("SD3.5", "FLUX.1-dev")

    def recognises_file(self, path: Path) -> bool:
        """Whether a weights file is this family's (a transformer or a LoRA of one), from its key names."""
        raise NotImplementedError

    def own(self, module: str):
        """One of the family's own modules (worlds/<family>/<module>.py), imported when a command needs it."""
        import importlib

        return importlib.import_module(f"{type(self).__module__.rpartition('.')[0]}.{module}")

    def load_pipeline(self, model: str | Path, **options):
        return self.own("pipeline").load_pipeline(model, **options)

    def transfer_function(self):
        return self.own("transfer").transfer

    def bench(self, options: dict) -> tuple[dict, str]:
        """The family's training iteration on random-weight full-size architectures (its bench.py), or `memory` (its
        memory model: memory.py)."""
        o = options
        if o.get("inference"):
            raise NitroFusionError(f"bench --inference compares SDXL's stock and fast generation paths; "
                                   f"{self.name.upper()} has no fast path: drop --inference (or --family {self.name})")
        if o.get("memory"):
            memory = self.own("memory")
            result = memory.memory_model(overrides=o.get("overrides"), fsdp=tuple(o.get("fsdp") or ()))
            return result, memory.format_memory(result)
        from ...training.bench import bench_device, format_table

        bench_device(o["size"], o.get("device"), self.bench_label)  # before the training stack loads: a quick refusal
        result = self.own("bench").run_bench(o["size"], o.get("device"), o.get("overrides"), iters=o["iters"],
                                             warmup=o["warmup"])
        return result, format_table(result)

    def recognises(self, kind: str, path: Path) -> bool:
        if kind == "pipeline":
            return class_of(path / "model_index.json") == self.family.pipeline
        if kind == "student":
            return class_of(path / "transformer" / "config.json") == self.transformer_class
        if kind == "file":
            return self.recognises_file(path)
        return kind == "unet" and class_of(path / "config.json") == self.transformer_class

    def transformer_plan(self, cfg: DistillConfig, taps: list[int]):
        """(the teacher's transformer on the meta device, the run's ModelPlan: parameters, what trains, E's widths),
        from its config.json alone."""
        import diffusers
        import torch

        folder = teacher_folder(cfg)
        with torch.device("meta"):
            model = getattr(diffusers, self.transformer_class).from_config(
                json.loads((folder / "transformer" / "config.json").read_text()))
        parameters = sum(p.numel() for p in model.parameters())
        if cfg.student.kind == "lora":  # the adapters alone train
            from ...models.student import lora_parameter_count

            trainable = lora_parameter_count(model, cfg.student)
        else:
            trainable = parameters
        what = f"{self.family.article} {self.family.label} pipeline"
        return model, ModelPlan(teacher_text(cfg, what), parameters, trainable, [model.inner_dim] * len(taps))


class UNetPipelineWorld(PipelineWorld):
    """SDXL and SD 1.x/2.x: UNet pipelines, one inference machinery (worlds/pipelines/)."""

    family: Family

    def plan_model(self, cfg: DistillConfig) -> ModelPlan:
        return self.plan_unet(cfg)[0]

    def plan_unet(self, cfg: DistillConfig, need_model: bool = False) -> tuple[ModelPlan, object]:
        """The plan (`check_teacher`, then what the run builds) and the meta-device UNet, if one was built."""
        self.check_teacher(cfg)
        return unet_plan(teacher_text(cfg, f"{self.family.article} {self.family.label} pipeline"),
                         teacher_folder(cfg) / "unet", cfg, need_model)

    def check_teacher(self, cfg: DistillConfig) -> None:
        """The teacher folder's family and parts, the section's weight files, the resolution against the VAE and
        UNet, from config.json files only."""
        section = getattr(cfg, self.name)
        if not cfg.teacher:
            raise NitroFusionError(f"world '{self.name}' needs a teacher: --teacher DIR (a diffusers "
                                   f"{self.family.pipeline} folder)")
        folder = teacher_folder(cfg)
        check_pipeline_folder(folder, self.family)
        for key, what in (("teacher_unet", "UNet weights file"), ("teacher_lora", "teacher LoRA")):
            path = getattr(section, key)
            if path and not Path(path).exists():
                raise NitroFusionError(f"{what} not found: {path} ({self.name}.{key})")
        config = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        multiple = 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(config["block_out_channels"]) - 1)
        if section.resolution % multiple:
            raise NitroFusionError(f"{self.name}.resolution {section.resolution} must be a multiple of {multiple} "
                                   "for this VAE and UNet")

    export_formats = ("diffusers", "single-file", "lora")
    supported_options = ("--base", "--shift", "--height", "--width", "--dtype", "--fast", "--vae", "--vae-dtype")

    def recognises_unet(self, kind: str, path: Path, text_time: bool) -> bool:
        """A run's student folder or a UNet folder of this family: SDXL's UNet has text_time micro-conditioning."""
        file = path / "unet" / "config.json" if kind == "student" else path / "config.json"
        if not file.is_file():
            return False
        config = json.loads(file.read_text())
        if text_time:
            return config.get("addition_embed_type") == "text_time"
        return config.get("addition_embed_type") is None and "cross_attention_dim" in config

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

    def load_pipeline(self, model: str | Path, **options):
        """The stock pipeline `generate` samples `model` with (worlds/pipelines/pipeline.py)."""
        from .pipeline import load_pipeline

        return load_pipeline(model, **options)

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

    def transfer_function(self):
        from .export import transfer

        return transfer

