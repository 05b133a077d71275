"""The `flux` config section (FLUX.1-dev, guidance-distilled; FLUX.1-schnell is read too); torch-free, so configs
check fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ranged
from ...errors import ConfigError
from ...sampling.spec import SamplerSpec
from ..pipelines.config import check_pipeline_run

GUIDANCE_KEY = "_nitrofusion_guidance"  # the student's embedded guidance, in its scheduler_config.json (a private key)
TEACHER_SAMPLER = "FlowMatchEulerDiscreteScheduler"  # FluxPipeline's own; the adapter runs it as that pipeline does

# A LoRA student's default targets on FLUX (DistillConfig puts them in place of the UNet list): diffusers' FLUX LoRA
# trainers' list (both streams' attention projections and feed-forwards of the double-stream blocks; the single-stream
# blocks' to_q/k/v match too), plus the single-stream blocks' MLP input `proj_mlp`. PEFT matches a name or its ending
# after a dot
FLUX_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"]


@dataclass
class FluxConfig:
    resolution: int = ranged(1024, ge=16, le=8192)  # pixels; latents are resolution / 8, tokens 2x2 latent patches
    # The teacher sampler: FLUX.1-dev's own (FluxPipeline's defaults): flow-matching Euler on sigmas linspace(1, 1/n, n)
    # warped by the resolution-dependent shift mu, 28 steps, and guidance_scale 3.5 given to the GUIDANCE EMBEDDING
    # (dev is guidance-distilled: one forward per step, no classifier-free guidance, no null prompt)
    sampler: SamplerSpec = field(default_factory=lambda: SamplerSpec(name=TEACHER_SAMPLER, steps=28,
                                                                     guidance_scale=3.5))
    # E: the first `backbone_blocks` double-stream blocks (`transformer_blocks`; dev has 19); heads read the image
    # tokens after each tapped block (0-based indices below backbone_blocks), on their 2-D grid (docs/method.md §8)
    backbone_blocks: int = ranged(10, ge=1, le=1000)
    taps: list[int] = ranged(factory=lambda: [2, 5, 7, 9], ge=0, le=999)
    max_sequence_length: int = ranged(512, ge=1, le=512)  # T5 tokens (FLUX.1-dev's pipeline default; schnell: 256)
    # T5's states of every pair's prompt are stored with the teacher pairs, and a run whose prompts all come from
    # them trains without T5 resident (T5-XXL: 4.8B parameters, 8.9 GiB in bf16); off: T5 stays and encodes live
    t5_cache: bool = True
    # The embedded guidance the STUDENT (and E) is called with. The student keeps the teacher's guidance input fixed at
    # the value its pairs were sampled with (3.5, dev's default), so its one step starts from the teacher's own
    # conditioning; it is stored with the student's scheduler and `generate` passes it as FluxPipeline's guidance_scale
    guidance: float = ranged(3.5, ge=0, le=100)

    def validate(self) -> None:
        if self.resolution % 16:
            raise ConfigError("flux.resolution must be a positive multiple of 16 (8x VAE, 2x2 latent patches)")
        if not self.taps:
            raise ConfigError("flux.taps is empty: name the backbone blocks whose tokens the heads read, e.g. [2, 5]")
        bad = [t for t in self.taps if t >= self.backbone_blocks]
        if bad:
            raise ConfigError(f"flux.taps {bad} out of range: a tapped block must be below flux.backbone_blocks "
                              f"({self.backbone_blocks}), i.e. 0..{self.backbone_blocks - 1}")
        if len(set(self.taps)) != len(self.taps) or self.taps != sorted(self.taps):
            raise ConfigError(f"flux.taps {self.taps} must be increasing block indices without repeats")
        if self.sampler.name != TEACHER_SAMPLER or self.sampler.timesteps:
            raise ConfigError(f"flux.sampler.name {self.sampler.name} is not built for FLUX: the teacher samples with "
                              f"its own pipeline's {TEACHER_SAMPLER} (dynamic shift, no sampler.timesteps)")
        self.sampler.validate()


def check_run(cfg) -> None:
    check_pipeline_run(cfg)
    if cfg.student_init != "teacher":
        raise ConfigError(f"student_init {cfg.student_init} is not built for world 'flux' yet: the student starts "
                          "from the teacher (student_init=teacher)")
