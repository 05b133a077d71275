"""The distillation config: every knob of SPEC sections 2-4 plus the run's budget and bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .adapters.sdxl import SDXLConfig
from .errors import ConfigError
from .method.pool import PoolConfig
from .method.refine import MultiStepConfig
from .method.step import AdversarialConfig
from .real_data import RealConfig


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    kind: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes' AdamW8bit (GPU; optimizer state /4)
    zero: bool = False  # student only: shard the optimiser state over the processes (ZeRO stage 1)

    def validate(self) -> None:
        if self.lr <= 0 or len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optimiser: lr > 0 and two betas in [0, 1) are required")


@dataclass
class PairsConfig:
    count: int = 4000
    seed: int = 0
    shard_size: int = 1000
    batch_size: int = 64
    dir: str = ""  # empty: the cache folder, keyed by teacher, sampler, prompts, count and seed
    online: bool = False  # sample the teacher during training instead of reading a cache (no disk, slower steps)
    in_memory: bool = True  # read the whole cache into RAM; false streams rows from the shards (SDXL scale)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # storage (float16 halves an SDXL cache)

    def validate(self) -> None:
        if self.count < 1 or self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError("pairs.count, pairs.shard_size and pairs.batch_size must be >= 1")


@dataclass
class PromptsConfig:
    source: str = ""  # .txt (one per line), .csv/.tsv/.jsonl (column), a `datasets` folder, or hf:NAME
    column: str = ""  # empty: the first of prompt / caption / text
    split: str = "train"
    max_chars: int = 1000  # longer prompts are skipped and counted

    def validate(self) -> None:
        if self.max_chars < 1:
            raise ConfigError("prompts.max_chars must be >= 1")


@dataclass
class DistillConfig:
    world: Literal["mini", "sdxl"] = "mini"
    teacher: str = ""  # teacher folder: a diffusers SDXL pipeline (sdxl); empty = the shipped teacher (mini)
    sdxl: SDXLConfig = field(default_factory=SDXLConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)  # sdxl; the mini world uses its 10 classes
    student_init: str = "teacher"  # "teacher" or a UNet weights file (.safetensors)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    multistep: MultiStepConfig = field(default_factory=MultiStepConfig)  # train the 2-4 step refinements too
    real: RealConfig = field(default_factory=RealConfig)  # what the heads see as real: teacher, data or mix
    student_optim: OptimConfig = field(default_factory=OptimConfig)
    heads_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    pairs: PairsConfig = field(default_factory=PairsConfig)
    micro_batch: int = 5
    grad_accum: int = 20
    max_images: int = 0  # training budget in images (edm2-style); 0 = unlimited
    max_minutes: float = 0.0  # wall-clock budget across resumes; 0 = unlimited
    ema_decay: float = 0.0  # EMA of the student; 0 disables
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    max_grad_norm: float = 0.0  # 0 = no clipping
    checkpoint_every: int = 200  # optimiser steps
    keep_checkpoints: int = 2
    eval_every: int = 0  # optimiser steps between quality evaluations (mini world); 0 = only at the end
    eval_samples: int = 500
    log_every: int = 1
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ConfigError("micro_batch and grad_accum must be >= 1")
        if self.max_images <= 0 and self.max_minutes <= 0:
            raise ConfigError("set a budget: max_images > 0 or max_minutes > 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay must be in [0, 1)")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ConfigError("checkpoint_every, keep_checkpoints and log_every must be >= 1")
        if self.world == "mini" and (self.prompts.source or self.sdxl.teacher_unet or self.sdxl.teacher_lora):
            raise ConfigError("prompts.* and sdxl.* apply to world 'sdxl'; the mini world's prompts are its 10 classes")
        self.real.check_world(self.world)
