"""The `sdxl` config section; torch-free, so configs check fast (adapters/sdxl.py uses it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ranged
from ...errors import ConfigError
from ...sampling.spec import SamplerSpec


@dataclass
class SDXLConfig:
    teacher_unet: str = ""  # UNet weights (.safetensors, or .bin read weights-only) replacing the folder's UNet
    teacher_lora: str = ""  # LoRA (file or folder, any format diffusers' SDXL loader reads) fused into the teacher
    lora_scale: float = ranged(1.0, ge=0)
    resolution: int = ranged(1024, ge=8, le=8192)  # pixels; latents are resolution / 8
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(
        name="x0-renoise", steps=4, guidance_scale=0.0, timesteps=[999, 749, 499, 249]))

    def validate(self) -> None:
        if self.resolution % 8:
            raise ConfigError("sdxl.resolution must be a positive multiple of 8")
        self.sampler.validate()
