"""The distillation config: every knob of docs/method.md §2-4 plus the run's budget and bookkeeping. Torch-free:
a config is read and checked before any model library loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .config import ranged
from .errors import ConfigError
from .method.config import AdversarialConfig, MultiStepConfig, PoolConfig
from .worlds.config import check_config
from .worlds.flux.config import FLUX_LORA_TARGETS, FluxConfig
from .worlds.sd.config import SDConfig
from .worlds.sd3.config import SD3_LORA_TARGETS, SD3Config
from .worlds.sdxl.config import SDXLConfig

PIPELINE_SECTIONS = ("sdxl", "sd", "sd3", "flux")  # the config sections of the pipeline worlds, named as their world


@dataclass
class OptimConfig:
    lr: float = ranged(1e-6, gt=0, le=1)
    betas: list[float] = ranged(factory=lambda: [0.9, 0.999], ge=0, lt=1)
    weight_decay: float = ranged(0.01, ge=0)
    kind: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes' AdamW8bit (GPU; optimizer state /4)
    # constant, or linear: lr falls in a straight line to 0 at max_images (set from the images done, so a
    # resumed run continues the same line)
    schedule: Literal["constant", "linear"] = "constant"
    zero: bool = False  # student only: shard the optimiser state over the processes (ZeRO stage 1)

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"optimiser betas: give two values in [0, 1), e.g. [0.9, 0.999] (got {self.betas})")


@dataclass
class PairsConfig:
    count: int = ranged(4000, ge=1)
    seed: int = ranged(0, ge=0, le=2**31 - 1)
    shard_size: int = ranged(1000, ge=1)
    batch_size: int = ranged(64, ge=1)
    dir: str = ""  # empty: the cache folder, keyed by teacher, sampler, prompts, count and seed
    online: bool = False  # sample the teacher during training instead of reading a cache (no disk, slower steps)
    in_memory: bool = True  # read the whole cache into RAM; false streams rows from the shards (SDXL scale)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # storage (float16 halves an SDXL cache)
    # 0: every epoch draws from all the pairs. n: epoch e draws from the first n + e shards, so training
    # can start once n shards exist while the rest are made beside it (the demo); same model on any machine
    start_shards: int = ranged(0, ge=0)

    @property
    def shards(self) -> int:
        return (self.count + self.shard_size - 1) // self.shard_size


@dataclass
class PromptsConfig:
    source: str = ""  # .txt (one per line), .csv/.tsv/.jsonl (column), a `datasets` folder, or hf:NAME
    column: str = ""  # empty: the first of prompt / caption / text
    split: str = "train"
    max_chars: int = ranged(1000, ge=1)  # longer prompts are skipped and counted


@dataclass
class RealConfig:
    source: Literal["teacher", "data", "mix"] = "teacher"  # teacher = the paper; data / mix need real images
    share: float = ranged(0.5, gt=0, lt=1)  # mix: fraction of every micro-batch taken from real images
    data: str = ""  # sdxl, sd: a folder of images with captions; mini: empty (Fashion-MNIST's train split)
    count: int = ranged(0, ge=0)  # real images used, the first `count` in order; 0 = all
    seed: int = ranged(0, ge=0, le=2**31 - 1)  # seeds the x_T of real rows


# LoRA targets by default: attention (self and cross: q, k, v, out), feed-forward (GEGLU in, out) and the
# resnets' two 3x3 convolutions; PEFT matches a name or its ending after a dot. Worlds sd3 and flux have their own
# defaults (worlds/sd3/config.py, worlds/flux/config.py), put in place of this one by DistillConfig.validate
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


@dataclass
class StudentConfig:
    kind: Literal["full", "lora"] = "full"  # full = the paper (every UNet weight trains); lora = adapters only [ours]
    rank: int = ranged(16, ge=1, le=4096)  # lora: rank r of every adapter
    alpha: float = ranged(0.0, ge=0)  # lora: scale = alpha / rank; 0 = rank (scale 1)
    dropout: float = ranged(0.0, ge=0, lt=1)  # lora: dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # lora: layer names (see above)
    # [w_min, w_max]: the student takes the guidance scale w as conditioning (a latent-consistency UNet's
    # time_cond_proj_dim; docs/method.md §10), trained on teacher pairs made at w drawn per pair from this range;
    # empty = off (the student is frozen at the teacher sampler's one guidance scale)
    guidance: list[float] = ranged(factory=list, gt=0, le=100)
    guidance_lr_scale: float = ranged(1.0, gt=0, le=10_000)  # the guidance projection's lr / student_optim.lr

    def validate(self) -> None:
        if self.kind == "lora" and not self.targets:
            raise ConfigError("student.targets is empty: name the layers to adapt, e.g. [to_q, to_k, to_v, to_out.0]")
        if self.guidance and (len(self.guidance) != 2 or self.guidance[0] > self.guidance[1]):
            raise ConfigError(f"student.guidance: give [w_min, w_max] with 0 < w_min <= w_max, e.g. [1, 5] (got "
                              f"{self.guidance}), or [] for a student at the teacher's one guidance scale")
        if self.guidance and self.kind == "lora":
            raise ConfigError("student.guidance needs student.kind=full: the guidance input is a new layer of the "
                              "student UNet, and a LoRA student shares its UNet with the teacher")


@dataclass
class DistillConfig:
    world: Literal["mini", "sdxl", "sd", "sd3", "flux"] = "mini"
    teacher: str = ""  # teacher folder: a diffusers SDXL (sdxl) or SD 1.x/2.x (sd) pipeline; empty = mini's shipped one
    sdxl: SDXLConfig = field(default_factory=SDXLConfig)
    sd: SDConfig = field(default_factory=SDConfig)  # Stable Diffusion 1.x / 2.x: the same keys as sdxl
    sd3: SD3Config = field(default_factory=SD3Config)  # Stable Diffusion 3 / 3.5 (a DiT trained as a flow)
    flux: FluxConfig = field(default_factory=FluxConfig)  # FLUX.1-dev (a guidance-distilled DiT trained as a flow)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)  # sdxl, sd; the mini world uses its 10 classes
    student_init: str = "teacher"  # "teacher", or a .safetensors UNet (student.kind full) / LoRA (kind lora)
    student: StudentConfig = field(default_factory=StudentConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    multistep: MultiStepConfig = field(default_factory=MultiStepConfig)  # train the 2-4 step refinements too
    real: RealConfig = field(default_factory=RealConfig)  # what the heads see as real: teacher, data or mix
    student_optim: OptimConfig = field(default_factory=OptimConfig)
    heads_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    pairs: PairsConfig = field(default_factory=PairsConfig)
    micro_batch: int = ranged(5, ge=1)
    grad_accum: int = ranged(20, ge=1)
    max_images: int = ranged(0, ge=0)  # training budget in images (edm2-style); 0 = unlimited
    max_minutes: float = ranged(0.0, ge=0)  # wall-clock budget across resumes; 0 = unlimited
    ema_decay: float = ranged(0.0, ge=0, lt=1)  # EMA of the student; 0 disables
    # frozen networks' dtype and the autocast dtype of their forward passes (docs/architecture.md, precision);
    # fp16 is refused by validate(): our backward passes are not loss-scaled
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    # FSDP2 (training/fsdp.py): a full student's weights, gradients and optimiser state sharded over the processes
    # (2 or more: accelerate launch or torchrun), for students whose training state exceeds one GPU
    fsdp: bool = False
    max_grad_norm: float = ranged(0.0, ge=0)  # 0 = no clipping
    # intervals in training images, like the budget (an event fires on the step whose images cross a multiple)
    checkpoint_every_images: int = ranged(6400, ge=1)
    keep_checkpoints: int = ranged(2, ge=1)
    eval_every_images: int = ranged(0, ge=0)  # mini world: 1-step classifier-FID during training; 0 = none
    eval_samples: int = ranged(500, ge=10)
    log_every_images: int = ranged(1, ge=1)  # 1: every optimiser step
    seed: int = ranged(0, ge=0, le=2**31 - 1)
    threads: int = ranged(0, ge=0, le=1024)  # 0 = automatic: usable cores less one (threads.py)

    # keys that were renamed: a preset, file or --set using the old name gets this one line
    RENAMED: ClassVar[dict[str, str]] = {
        f"{name}_every": f"{name}_every_images (intervals are counted in images now: multiply the old value, in "
        "optimiser steps, by micro_batch x grad_accum x processes)" for name in ("checkpoint", "eval", "log")}

    @staticmethod
    def upgrade(saved: dict) -> dict:
        """A run's config.yaml written before intervals were counted in images: steps x images per step (one
        process: a run of N processes then checkpoints N times as often, never less)."""
        per_step = int(saved.get("micro_batch", 5)) * int(saved.get("grad_accum", 20))
        out = dict(saved)
        for name in ("checkpoint", "eval", "log"):
            if f"{name}_every" in out:
                out[f"{name}_every_images"] = int(out.pop(f"{name}_every")) * per_step
        return out

    def _check_fsdp(self) -> None:
        if self.student.kind != "full":
            raise ConfigError("fsdp shards a full student; a LoRA student's adapters are small and live on the "
                              "shared teacher: train it with fsdp=false (DDP)")
        if self.student_optim.zero:
            raise ConfigError("fsdp already shards the student's optimiser state; set student_optim.zero=false")
        if self.student_optim.kind != "adamw":
            raise ConfigError(f"fsdp takes student_optim.kind adamw (its state is sharded anyway); "
                              f"{self.student_optim.kind} on sharded parameters is not supported")

    def _check_start_shards(self) -> None:
        p = self.pairs
        if p.online or self.real.source == "data":
            raise ConfigError("pairs.start_shards applies to a cache of teacher pairs; set pairs.start_shards=0 "
                              "with pairs.online or real.source=data")
        if p.start_shards > p.shards:
            raise ConfigError(f"pairs.start_shards {p.start_shards} is more than the {p.shards} shards of "
                              f"pairs.count={p.count} at pairs.shard_size={p.shard_size}; lower it (0: all)")
        if p.start_shards * p.shard_size < self.micro_batch:
            raise ConfigError(f"pairs.start_shards x pairs.shard_size = {p.start_shards * p.shard_size} pairs is "
                              f"less than micro_batch {self.micro_batch}; raise pairs.start_shards")

    @property
    def pipeline_config(self) -> SDXLConfig | SD3Config | FluxConfig | None:
        """The active diffusers family's section (`sdxl`, `sd`, `sd3` or `flux`); None in the mini world."""
        return getattr(self, self.world) if self.world in PIPELINE_SECTIONS else None

    def validate(self) -> None:
        if self.world == "sd3" and self.student.targets == LORA_TARGETS:
            # the default names UNet layers (conv1, conv2) that an MMDiT lacks: an SD3 run's default is its own
            self.student.targets = list(SD3_LORA_TARGETS)
        if self.world == "flux" and self.student.targets == LORA_TARGETS:  # likewise: FLUX's own default
            self.student.targets = list(FLUX_LORA_TARGETS)
        if self.mixed_precision == "fp16":
            raise ConfigError("mixed_precision fp16 cannot train: the adversarial step's backward passes are not "
                              "loss-scaled, so fp16 gradients would underflow; use mixed_precision=bf16 (CPUs, CUDA "
                              "GPUs from Ampere on) or no (docs/architecture.md, precision)")
        if self.max_images <= 0 and self.max_minutes <= 0:
            raise ConfigError("set a budget: max_images > 0 or max_minutes > 0")
        if self.max_images and self.max_images < self.micro_batch * self.grad_accum:
            raise ConfigError(f"max_images {self.max_images} is less than one optimiser step "
                              f"(micro_batch x grad_accum = {self.micro_batch * self.grad_accum} images)")
        if self.real.source != "data" and not self.pairs.online and self.pairs.count < self.micro_batch:
            raise ConfigError(f"pairs.count {self.pairs.count} is smaller than micro_batch {self.micro_batch}; "
                              "generate more pairs or lower micro_batch")
        if self.pairs.start_shards:
            self._check_start_shards()
        for name in ("student_optim", "heads_optim"):
            if getattr(self, name).schedule == "linear" and not self.max_images:
                raise ConfigError(f"{name}.schedule linear decays to 0 at max_images; set max_images, or "
                                  f"{name}.schedule=constant with a max_minutes budget")
        check_config(self)  # the world's own checks (worlds/config.py)
        if self.fsdp:
            self._check_fsdp()
        if self.adversarial.regression_weight and self.real.source != "teacher":
            raise ConfigError(f"adversarial.regression_weight needs teacher pairs (a real image has no paired x_T); "
                              f"set it to 0 with real.source={self.real.source}, or use real.source=teacher")
        adv = self.adversarial
        if adv.regression_refine_until and not (adv.regression_weight and adv.regression_rows == "all"):
            raise ConfigError("adversarial.regression_refine_until limits the refinement rows' regression: it needs "
                              "adversarial.regression_rows=all and a regression_weight above 0, or set it to 0")
