"""The `sd3` config section (Stable Diffusion 3 / 3.5); torch-free, so configs check fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ranged
from ...errors import ConfigError
from ...sampling.spec import SamplerSpec
from ..pipelines.config import check_pipeline_run

# A LoRA student's default targets on an MMDiT (DistillConfig puts them in place of the UNet list, whose conv1/conv2
# no transformer has): both streams' attention projections (image: to_q/k/v, to_out.0; text: add_q/k/v_proj,
# to_add_out) and both streams' feed-forwards; PEFT matches a name or its ending after a dot
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


@dataclass
class SD3Config:
    resolution: int = ranged(1024, ge=16, le=8192)  # pixels; latents are resolution / 8, tokens latents / patch
    # The teacher sampler: SD3's own flow-matching Euler on its shifted sigmas, with guidance (SD3.5-medium's
    # defaults: 40 steps, CFG 4.5); the null prompt is the empty prompt's encoding, as its pipeline uses.
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(
        name="FlowMatchEulerDiscreteScheduler", steps=40, guidance_scale=4.5))
    # E: the first `backbone_blocks` transformer blocks; heads read the image tokens after each tapped block
    # (0-based indices below backbone_blocks), reshaped to their 2-D grid (docs/method.md §8)
    backbone_blocks: int = ranged(12, ge=1, le=1000)
    taps: list[int] = ranged(factory=lambda: [2, 5, 8, 11], ge=0, le=999)
    max_sequence_length: int = ranged(256, ge=1, le=512)  # T5 tokens (SD3's pipeline default)
    # T5's states of every pair's prompt are stored with the teacher pairs, and a run whose prompts all come from
    # them trains without T5 resident (T5-XXL: 4.8B parameters, 8.9 GiB in bf16); off: T5 stays and encodes live
    t5_cache: bool = True

    def validate(self) -> None:
        if self.resolution % 16:
            raise ConfigError("sd3.resolution must be a positive multiple of 16 (8x VAE, 2x2 patches)")
        if not self.taps:
            raise ConfigError("sd3.taps is empty: name the backbone blocks whose tokens the heads read, e.g. [2, 5]")
        bad = [t for t in self.taps if t >= self.backbone_blocks]
        if bad:
            raise ConfigError(f"sd3.taps {bad} out of range: a tapped block must be below sd3.backbone_blocks "
                              f"({self.backbone_blocks}), i.e. 0..{self.backbone_blocks - 1}")
        if len(set(self.taps)) != len(self.taps) or self.taps != sorted(self.taps):
            raise ConfigError(f"sd3.taps {self.taps} must be increasing block indices without repeats")
        self.sampler.validate()


def check_run(cfg) -> None:
    check_pipeline_run(cfg)
    if cfg.sd3.sampler.name == "student":  # sampling/teacher.py's student loop is the shifted LCM one
        raise ConfigError("sd3.sampler.name student (a few-step student as the teacher) is not implemented for a "
                          "flow-matching teacher; use its own scheduler, e.g. FlowMatchEulerDiscreteScheduler")
