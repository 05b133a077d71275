"""The `sdxl` config section; torch-free, so configs check fast (worlds/sdxl/adapter.py uses it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...sampling.spec import SamplerSpec
from ..pipelines.config import PipelineConfig, check_unet_pipeline_run


@dataclass
class SDXLConfig(PipelineConfig):
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(
        name="x0-renoise", steps=4, guidance_scale=0.0, timesteps=[999, 749, 499, 249]))

    section = "sdxl"


def check_run(cfg) -> None:
    check_unet_pipeline_run(cfg, "sd")
