"""FLUX.1: the guidance-embedding DiT flow-matching family (docs/method.md §8, FLUX)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ...distill_config import DistillConfig
from ...errors import NitroFusionError
from ..base import ModelPlan
from ..pipelines.world import PipelineWorld, teacher_folder, teacher_text

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ...method.adapter import ModelAdapter

EXAMPLES = ["a photo of a red fox in the snow", "a poster that says 'one step' in bold letters"]
TRANSFORMER = "FluxTransformer2DModel"
NEEDS_TEACHER = "world 'flux' needs a teacher: --teacher DIR (a diffusers FluxPipeline folder, FLUX.1-dev)"


def _class_of(config: Path) -> str | None:
    return json.loads(config.read_text()).get("_class_name") if config.is_file() else None


class FluxWorld(PipelineWorld):
    """Prompts and real images as every pipeline family's; its own adapter, inference and export."""

    name = "flux"
    export_formats = ("diffusers",)
    supported_options = ("--base", "--shift", "--height", "--width", "--dtype")
    examples = EXAMPLES

    def adapter(self, cfg: DistillConfig) -> ModelAdapter:
        from .adapter import FluxAdapter

        if not cfg.teacher:
            raise NitroFusionError(NEEDS_TEACHER)
        return FluxAdapter(teacher_folder(cfg), cfg.flux)

    def check_teacher(self, cfg: DistillConfig) -> None:
        """The folder's family and parts, flux.backbone_blocks against its depth, and a full student's size, from
        its index and config.json files alone."""
        from ..pipelines.family import FLUX, check_pipeline_folder
        from .adapter import check_backbone, check_student_size

        if not cfg.teacher:
            raise NitroFusionError(NEEDS_TEACHER)
        folder = teacher_folder(cfg)
        check_pipeline_folder(folder, FLUX)
        check_backbone(folder, cfg.flux)
        check_student_size(folder, cfg.student.kind, cfg.fsdp)

    def plan_model(self, cfg: DistillConfig) -> ModelPlan:
        import torch
        from diffusers import FluxTransformer2DModel

        self.check_teacher(cfg)
        folder = teacher_folder(cfg)
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(json.loads((folder / "transformer" / "config.json").read_text()))
        parameters = sum(p.numel() for p in model.parameters())
        if cfg.student.kind == "lora":  # the adapters alone train
            from ...models.student import lora_parameter_count

            trainable = lora_parameter_count(model, cfg.student)
        else:
            trainable = parameters
        return ModelPlan(teacher_text(cfg, "a FLUX pipeline"), parameters, trainable,
                         [model.inner_dim] * len(cfg.flux.taps))

    def recognises(self, kind: str, path: Path) -> bool:
        if kind == "pipeline":
            return _class_of(path / "model_index.json") == "FluxPipeline"
        if kind == "student":
            return _class_of(path / "transformer" / "config.json") == TRANSFORMER
        return kind == "unet" and _class_of(path / "config.json") == TRANSFORMER

    def load_pipeline(self, model: str | Path, **options):
        from .pipeline import load_pipeline

        return load_pipeline(model, **options)

    def export(self, model: str, fmt: str, out: str, options: dict) -> list[str]:
        from ...dtypes import parse_dtype

        if fmt in ("single-file", "lora"):
            raise NitroFusionError(f"export --format {fmt} is not implemented for FLUX models yet; use --format "
                                   "diffusers (a FluxPipeline folder)")
        if fmt != "diffusers":
            raise NitroFusionError(f"export --format {fmt} is not implemented for FLUX models; use --format diffusers")
        from .pipeline import export_diffusers

        export_diffusers(model, out, base=options.get("base"), shift=options.get("shift"),
                         dtype=parse_dtype(options.get("dtype")))
        return [f"exported to {out}"]

    def transfer(self, student: str, base: str, custom: str, out: str, options: dict) -> list[str]:
        raise NitroFusionError(f"transfer is not implemented for FLUX models yet ({student} is a flux-world model)")

    def bench(self, options: dict) -> tuple[dict, str]:
        raise NitroFusionError("bench is not implemented for FLUX yet (no timing or memory model of FLUX.1-dev); use "
                               "--family sdxl or sd3")
