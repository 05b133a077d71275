"""Stable Diffusion 1.x / 2.x: the training half is this folder's (adapter, config section `sd`); the inference half
(generate, app, evaluate, export, transfer) is the UNet-pipeline machinery shared with SDXL, which loads a
`StableDiffusionPipeline` for these models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ...distill_config import DistillConfig
from ...errors import NitroFusionError
from ..pipelines.family import SD
from ..pipelines.world import UNetPipelineWorld, teacher_folder

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ...method.adapter import ModelAdapter

EXAMPLES = ["a photo of a red fox in the snow", "a watercolour of a harbour at dawn"]


class SDWorld(UNetPipelineWorld):
    name = "sd"
    family = SD
    examples = EXAMPLES

    def adapter(self, cfg: DistillConfig) -> ModelAdapter:
        from .adapter import SDAdapter

        if not cfg.teacher:
            raise NitroFusionError("world 'sd' needs a teacher: --teacher DIR (a diffusers StableDiffusionPipeline "
                                   "folder, SD 1.x or 2.x)")
        return SDAdapter(teacher_folder(cfg), cfg.sd)

    def recognises(self, kind: str, path: Path) -> bool:
        if kind == "pipeline":
            return json.loads((path / "model_index.json").read_text()).get("_class_name") == "StableDiffusionPipeline"
        if kind == "file":  # a weights file's family is its --base folder's (the shared UNet machinery reads it)
            return False
        return self.recognises_unet(kind, path, text_time=False)

    def bench(self, options: dict) -> tuple[dict, str]:
        raise NitroFusionError("bench measures SDXL (--size full or tiny) and the mini world (--size mini); an SD "
                               "1.x/2.x bench is not written yet")
