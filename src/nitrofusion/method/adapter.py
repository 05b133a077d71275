"""What the method asks of a model family: the training calls, implemented by each world (docs/architecture.md).

A conditioning `Cond` is a dict of tensors whose first dimension is the batch, so the core can index,
concatenate and null it without knowing what is inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..models.student import base_only
from ..sampling.teacher import Predict, SamplerSpec, sample
from . import guidance
from .diffusion import NoiseProcess, VariancePreserving

Cond = dict[str, torch.Tensor]


def cond_index(cond: Cond, idx) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


def cond_cat(*conds: Cond) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_to(cond: Cond, device, dtype=None) -> Cond:
    return {k: v.to(device, dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
            for k, v in cond.items()}


class ModelAdapter(ABC):
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    alphas_cumprod: torch.Tensor
    scheduler_config: dict
    teacher_unet: torch.nn.Module
    sampler: SamplerSpec
    crop_multiple: int = 1  # crops are multiples of this many latent pixels (the backbone's downsampling)
    student_subfolder: str = "unet"  # a run's student is the diffusers model folder run/student/<this>

    def make_backbone(self, gradient_checkpointing: bool = False) -> torch.nn.Module:
        """The frozen discriminator backbone E on the teacher (docs/method.md §3): the UNet's encoder."""
        from .backbone import UNetBackbone

        return UNetBackbone(self.teacher_unet, gradient_checkpointing)

    def save_lora(self, folder: Path, factors: dict[str, torch.Tensor], unet_config, rank: int, shift: int,
                  alpha: float, metadata: dict) -> None:
        """Write a LoRA student's trained adapters into `folder` in the family's LoRA formats (a run's
        student/lora, which `export --format lora` hands on exactly)."""
        raise NotImplementedError(f"{type(self).__name__} trains no LoRA students")

    # Prompt states stored with the teacher pairs (data/text_cache.py), so that a large text encoder need not stay
    # resident while training: a family that has one names its states; none by default
    text_cache = None  # the pair set's TextCache, set when its pairs are loaded (data/pair_cache.py)

    def cached_text_names(self) -> tuple[str, ...]:
        """The names of the states `cacheable_text` gives; () when the family caches none."""
        return ()

    def cacheable_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{name: [B, ...]} states of the prompts' cacheable encoding, in the encoder's own dtype; {} if none."""
        return {}

    def text_cache_tag(self) -> str:
        """What the cached states depend on besides the prompts (part of the pair cache's key); '' if none."""
        return ""

    def release_cached_encoders(self) -> int:
        """Read the cacheable states from `text_cache` from now on and free the encoder that makes them; every
        prompt encoded afterwards must be in the cache. Returns the bytes of weights freed (0: nothing)."""
        return 0

    def student_scheduler(self, shift: int):
        """The scheduler a student of this family is sampled with in 1-4 steps (docs/method.md §5)."""
        from ..sampling.student import shifted_scheduler

        return shifted_scheduler(self.scheduler_config, shift)

    @property
    def process(self) -> NoiseProcess:
        """The forward process and x0 rule of this family's models (method/diffusion.py): DDPM by default."""
        return VariancePreserving(self.alphas_cumprod, self.prediction_type, self.num_train_timesteps)

    def to(self, device, dtype: torch.dtype | None = None) -> ModelAdapter:
        """Move the frozen models (teacher/backbone; the adapter's encoders) to device and dtype."""
        self.teacher_unet.to(device=device)
        if dtype is not None:
            self.teacher_unet.to(dtype=dtype)
        return self

    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one x_T."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Prompt conditioning for the UNet."""

    @abstractmethod
    def null_cond(self, cond: Cond) -> Cond:
        """The null prompt for the same batch: zero embeddings (docs/method.md §3)."""

    @abstractmethod
    def unet_call(self, unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Model output of a full UNet (teacher or student)."""

    @abstractmethod
    def backbone_call(self, backbone, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                      boxes: torch.Tensor | None) -> list[torch.Tensor]:
        """Backbone feature maps; `boxes` are crop corners when x is a crop (SDXL: crop time_ids)."""

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [B, C, H, W], for viewing and evaluation."""

    def guided_predict(self, unet: torch.nn.Module, cond: Cond, guidance_scale: float) -> Predict:
        """Model output with classifier-free guidance (null = zero embeddings); no guidance if scale <= 1. Rows that
        carry their own w (`cond["guidance"]`, a guided student's pairs: docs/method.md §10) are guided at it."""
        rows_w = cond.get(guidance.KEY)
        if rows_w is None and guidance_scale <= 1.0:
            return lambda x, t: self.unet_call(unet, x, t, cond)
        prompt = guidance.prompt_only(cond)
        both = cond_cat(self.null_cond(prompt), prompt)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.unet_call(unet, torch.cat([x, x]), torch.cat([t, t]), both)
            uncond, cond_out = out.chunk(2)
            w = guidance_scale if rows_w is None else rows_w.to(out).view(-1, *[1] * (out.ndim - 1))
            return uncond + w * (cond_out - uncond)

        return predict

    @torch.no_grad()
    def teacher_sample(self, x_T: torch.Tensor, cond: Cond, spec: SamplerSpec | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        spec = spec or self.sampler
        with base_only(self.teacher_unet):  # a LoRA student shares this UNet: the teacher is its base
            return self._teacher_sample(x_T, cond, spec, generator)

    def _teacher_sample(self, x_T, cond, spec, generator) -> torch.Tensor:
        predict = self.guided_predict(self.teacher_unet, cond, spec.guidance_scale)
        return sample(predict, x_T, spec, self.scheduler_config, self.process, generator)
