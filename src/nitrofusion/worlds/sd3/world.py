"""Stable Diffusion 3 / 3.5: the DiT flow-matching family (docs/method.md §8)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...distill_config import DistillConfig
from ...errors import NitroFusionError
from ..base import ModelPlan
from ..pipelines.family import SD3
from ..pipelines.world import DiTPipelineWorld, teacher_folder

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ...method.adapter import ModelAdapter



class SD3World(DiTPipelineWorld):
    """Prompts and real images as every pipeline family's; its own adapter, inference, exports, bench and memory
    model."""

    name = "sd3"
    export_formats = ("diffusers", "single-file", "lora")
    supported_options = ("--base", "--shift", "--height", "--width", "--dtype")
    family = SD3
    bench_label = "SD3.5"
    transformer_class = "SD3Transformer2DModel"

    def adapter(self, cfg: DistillConfig) -> ModelAdapter:
        from .adapter import SD3Adapter

        if not cfg.teacher:
            raise NitroFusionError("world 'sd3' needs a teacher: --teacher DIR (a diffusers StableDiffusion3Pipeline "
                                   "folder, SD3 or SD3.5)")
        return SD3Adapter(teacher_folder(cfg), cfg.sd3)

    def check_teacher(self, cfg: DistillConfig) -> None:
        from ..pipelines.family import check_pipeline_folder
        from .adapter import check_backbone

        if not cfg.teacher:
            raise NitroFusionError("world 'sd3' needs a teacher: --teacher DIR (a diffusers StableDiffusion3Pipeline "
                                   "folder, SD3 or SD3.5)")
        check_pipeline_folder(teacher_folder(cfg), SD3)
        check_backbone(teacher_folder(cfg), cfg.sd3)

    def plan_model(self, cfg: DistillConfig) -> ModelPlan:
        import torch

        self.check_teacher(cfg)
        folder = teacher_folder(cfg)
        model, plan = self.transformer_plan(cfg, cfg.sd3.taps)
        from ...models.weights import header_numel
        from .memory import run_memory  # the memory model's peak for this teacher (worlds/sd3/memory.py)

        clip = [header_numel(folder / name) for name in ("text_encoder", "text_encoder_2")]
        t5 = header_numel(folder / "text_encoder_3") if (folder / "text_encoder_3").is_dir() else 0
        vae = header_numel(folder / "vae")
        if None not in (*clip, t5, vae):
            frozen = {"clip": sum(clip), "t5": t5, "vae": vae}
            plan.peak_bytes = run_memory(cfg, torch.nn.Module.to(model, torch.bfloat16), frozen)["total"]
        return plan

    def recognises_file(self, path: Path) -> bool:
        from ...models.architectures import is_dit_weights, is_flux_weights

        return is_dit_weights(path) and not is_flux_weights(path)  # a FLUX.1 file is the flux world's

    def export(self, model: str, fmt: str, out: str, options: dict) -> list[str]:
        from ...dtypes import parse_dtype

        base, shift, dtype = options.get("base"), options.get("shift"), parse_dtype(options.get("dtype"))
        if fmt == "lora":  # a LoRA run's trained adapters, or a full student's truncated SVD of student - base
            from .lora import export_lines

            return export_lines(model, out, options)
        if fmt not in self.export_formats:
            raise NitroFusionError(f"export --format {fmt} is not implemented for SD3 models; use --format diffusers "
                                   "(a StableDiffusion3Pipeline folder) or --format single-file (the original SD3 "
                                   "layout)")
        if fmt == "diffusers":
            from .pipeline import export_diffusers

            export_diffusers(model, out, base=base, shift=shift, dtype=dtype)
            return [f"exported to {out}"]
        from .export import export_single_file

        r = export_single_file(model, out, base=base, shift=shift, dtype=dtype)
        lines = [f"{r['tensors']} tensors in the original {r['architecture']} layout"
                 f"{'' if r['t5'] else ' (no T5: the pipeline has none)'}; round trip through diffusers' converters "
                 f"exact for all {r['round_trip_checked']} tensors; sample with shift {r['shift']}, 1-4 steps, no CFG"]
        if not r["clip_l_projection_identity"]:
            lines.append("note: CLIP-L's text_projection is not the identity; loaders of this layout (diffusers' "
                         "from_single_file, ComfyUI) pool CLIP-L without it, so their prompt embedding differs")
        return lines + [f"exported to {out}"]

