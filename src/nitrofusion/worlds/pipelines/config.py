"""The config keys every diffusers UNet pipeline family has (sections `sdxl` and `sd`); torch-free, so configs check
before any model library loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ranged
from ...errors import ConfigError
from ...sampling.spec import SamplerSpec


@dataclass
class PipelineConfig:
    teacher_unet: str = ""  # UNet weights (.safetensors, or .bin read weights-only) replacing the folder's UNet
    teacher_lora: str = ""  # LoRA (file or folder, any format the family's diffusers loader reads) fused in
    lora_scale: float = ranged(1.0, ge=0)
    resolution: int = ranged(1024, ge=8, le=8192)  # pixels; latents are resolution / 8
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(name="ddim", steps=25, guidance_scale=0.0))

    section = "pipeline"  # the config section's name, for messages

    def validate(self) -> None:
        if self.resolution % 8:
            raise ConfigError(f"{self.section}.resolution must be a positive multiple of 8")
        self.sampler.validate()


def check_pipeline_run(cfg) -> None:
    """A distill config of any pipeline world (DistillConfig.validate)."""
    if cfg.real.source != "teacher" and not cfg.real.data:
        raise ConfigError(f"real.source '{cfg.real.source}' needs real images: set real.data to a folder of images "
                          "with captions, or use real.source=teacher")
    if cfg.eval_every_images:
        raise ConfigError(f"eval_every_images applies to world 'mini' (its metric classifier); evaluate a "
                          f"{cfg.world} run's checkpoints with `nitrofusion evaluate`")
    if cfg.student.guidance:
        raise ConfigError(f"student.guidance (a guidance-scale input) is built for world 'mini' only; world "
                          f"'{cfg.world}' cannot take it yet: set student.guidance=[] (docs/method.md §10)")


def check_unet_pipeline_run(cfg, other: str) -> None:
    """A distill config of a UNet pipeline world: the other UNet family's teacher keys are not this run's."""
    check_pipeline_run(cfg)
    if getattr(cfg, other).teacher_unet or getattr(cfg, other).teacher_lora:
        raise ConfigError(f"{other}.* applies to world '{other}'; this run is world '{cfg.world}': set "
                          f"{cfg.world}.teacher_unet / {cfg.world}.teacher_lora instead")
