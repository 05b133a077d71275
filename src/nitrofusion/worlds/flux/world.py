"""FLUX.1: the guidance-embedding DiT flow-matching family (docs/method.md §8, FLUX)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...distill_config import DistillConfig
from ...errors import NitroFusionError
from ..base import ModelPlan
from ..pipelines.family import FLUX
from ..pipelines.world import DiTPipelineWorld, teacher_folder

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ...method.adapter import ModelAdapter

NEEDS_TEACHER = "world 'flux' needs a teacher: --teacher DIR (a diffusers FluxPipeline folder, FLUX.1-dev)"


class FluxWorld(DiTPipelineWorld):
    """Prompts and real images as every pipeline family's; its own adapter, inference, exports, bench and memory
    model."""

    name = "flux"
    export_formats = ("diffusers", "single-file", "lora")
    supported_options = ("--base", "--shift", "--height", "--width", "--dtype")
    family = FLUX
    bench_label = "FLUX.1-dev"
    transformer_class = "FluxTransformer2DModel"

    def adapter(self, cfg: DistillConfig) -> ModelAdapter:
        from .adapter import FluxAdapter

        if not cfg.teacher:
            raise NitroFusionError(NEEDS_TEACHER)
        return FluxAdapter(teacher_folder(cfg), cfg.flux)

    def check_teacher(self, cfg: DistillConfig) -> None:
        """The folder's family and parts, flux.backbone_blocks against its depth, and a full student's size, from
        its index and config.json files alone."""
        from ..pipelines.family import check_pipeline_folder
        from .adapter import (
            FULL_STUDENT_LIMIT,
            check_backbone,
            check_full_student_fits,
            transformer_config,
            transformer_parameters,
        )

        if not cfg.teacher:
            raise NitroFusionError(NEEDS_TEACHER)
        folder = teacher_folder(cfg)
        check_pipeline_folder(folder, FLUX)
        check_backbone(folder, cfg.flux)
        big = transformer_parameters(transformer_config(folder)) > FULL_STUDENT_LIMIT  # small ones: no counting
        if cfg.student.kind == "full" and not cfg.fsdp and big:
            check_full_student_fits(folder, self._plan(cfg).peak_bytes)

    def plan_model(self, cfg: DistillConfig) -> ModelPlan:
        self.check_teacher(cfg)
        return self._plan(cfg)

    def _plan(self, cfg: DistillConfig) -> ModelPlan:
        """What the run builds and the memory model's peak per GPU, from config.json files and weight headers."""
        import torch

        folder = teacher_folder(cfg)
        model, plan = self.transformer_plan(cfg, cfg.flux.taps)
        import os

        from ...models.weights import header_numel
        from .memory import run_memory  # the memory model's peak for this teacher (worlds/flux/memory.py)

        clip, vae = header_numel(folder / "text_encoder"), header_numel(folder / "vae")
        t5 = header_numel(folder / "text_encoder_2") if (folder / "text_encoder_2").is_dir() else 0
        if None not in (clip, t5, vae):
            shards = int(os.environ.get("WORLD_SIZE", "1") or 1) if cfg.fsdp else 1  # per GPU under FSDP
            plan.peak_bytes = run_memory(cfg, torch.nn.Module.to(model, torch.bfloat16),
                                         {"clip": clip, "t5": t5, "vae": vae}, shards=shards)["total"]
        return plan

    def recognises_file(self, path: Path) -> bool:  # a FLUX transformer (BFL layout or diffusers keys) or its LoRA
        from ...models.architectures import is_flux_weights

        return is_flux_weights(path)

    def export(self, model: str, fmt: str, out: str, options: dict) -> list[str]:
        from ...dtypes import parse_dtype

        base, shift, dtype = options.get("base"), options.get("shift"), parse_dtype(options.get("dtype"))
        if fmt == "lora":  # a LoRA run's trained adapters, or a full student's truncated SVD of student - base
            from .lora import export_lines

            return export_lines(model, out, options)
        if fmt not in self.export_formats:
            raise NitroFusionError(f"export --format {fmt} is not implemented for FLUX models; use --format diffusers "
                                   "(a FluxPipeline folder), single-file (the BFL transformer layout) or lora")
        if fmt == "diffusers":
            from .pipeline import export_diffusers

            export_diffusers(model, out, base=base, shift=shift, dtype=dtype)
            return [f"exported to {out}"]
        from .export import export_single_file

        r = export_single_file(model, out, base=base, shift=shift, dtype=dtype)
        return [f"{r['tensors']} transformer tensors in the BFL layout of {r['architecture']} (flux1-dev.safetensors': "
                "ComfyUI's Load Diffusion Model, diffusers' from_single_file); round trip through diffusers' converter "
                f"exact for all {r['round_trip_checked']} tensors; sample with shift {r['shift']}, embedded guidance "
                f"{r['guidance']:g}, 1-4 steps (the text encoders and VAE: FLUX.1-dev's own)", f"exported to {out}"]

