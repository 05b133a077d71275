"""The `sd` config section (Stable Diffusion 1.x / 2.x); torch-free. The UNet families' keys
(worlds/pipelines/config.py), other defaults: SD 1.5's 512 px, and a teacher that needs classifier-free guidance
(the base models are not distilled, unlike the DMD2 UNet the SDXL presets sample)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ranged
from ...sampling.spec import SamplerSpec
from ..pipelines.config import PipelineConfig, check_unet_pipeline_run


@dataclass
class SDConfig(PipelineConfig):
    resolution: int = ranged(512, ge=8, le=8192)  # pixels: 512 for SD 1.x and 2.x-base, 768 for 2.x (v-prediction)
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(
        name="dpmsolver++", steps=25, guidance_scale=7.5, timestep_spacing="trailing"))

    section = "sd"


def check_run(cfg) -> None:
    check_unet_pipeline_run(cfg, "sdxl")
