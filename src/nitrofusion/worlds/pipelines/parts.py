"""What every diffusers pipeline family's adapter shares: loading one component of a pipeline folder (an
interrupted download as one line), and the frozen networks with the family's KL VAE (moving them, real images in
and samples out, as the family's pipeline scales them)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import NitroFusionError, describe


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def load_component(cls, folder: Path):
    """cls.from_pretrained(folder), with a truncated or corrupt weights file (an interrupted download) as one
    line naming the folder."""
    try:
        return cls.from_pretrained(folder)
    except NitroFusionError:
        raise
    except Exception as e:  # noqa: BLE001 - loaders raise OSError, SafetensorError, ValueError... for a bad file
        raise NitroFusionError(f"cannot load {folder} as {cls.__name__} ({describe(e)}); the download may be "
                               "incomplete: fetch that folder again") from None


def load_teacher_pipeline(folder: Path, family, **parts):
    """The teacher's stock pipeline of `family` (family.py) from its folder, quietly; a truncated or corrupt download
    as one line naming the folder."""
    from .pipeline import quiet_loading

    try:
        with quiet_loading():
            return family.pipeline_class().from_pretrained(folder, **parts)
    except Exception as e:  # noqa: BLE001 - a truncated download surfaces as many types
        raise NitroFusionError(f"cannot load the {family.label} pipeline in {folder} ({describe(e)}); the download may "
                               "be incomplete") from None


class PipelineParts:
    """A diffusers family's frozen networks (`frozen_modules`) and its KL VAE (`self.vae`): moving them, and real
    images in and samples out through the VAE, as the family's pipeline scales them."""

    vae: torch.nn.Module

    def frozen_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def to(self, device, dtype: torch.dtype | None = None):
        """Move the frozen parts (cast to `dtype`); the VAE stays fp32 (SDXL's overflows in fp16: force_upcast)."""
        for m in self.frozen_modules():
            m.to(device=device)
            if dtype is not None and module_dtype(m) != dtype:
                m.to(dtype=dtype)
        self.vae.to(device=device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] at the run's resolution -> the latents the model works on (the VAE posterior's
        mean, shifted and scaled as the pipelines do): a real sample in the same space as a teacher sample."""
        z = self.vae.encode(images.to(self.vae.device, torch.float32)).latent_dist.mean
        if getattr(self.vae.config, "shift_factor", None):
            z = z - self.vae.config.shift_factor
        return (z * self.vae.config.scaling_factor).float().cpu()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (fp32 decode: SDXL's VAE overflows in fp16)."""
        x = x.to(self.vae.device, torch.float32) / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None):
            x = x + self.vae.config.shift_factor
        return self.vae.decode(x).sample.add(1).div(2).clamp(0, 1)
