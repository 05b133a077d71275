"""What every diffusers pipeline family's adapter shares: loading one component of a pipeline folder (an
interrupted download as one line), and the frozen networks with the family's KL VAE (moving them, real images in
and samples out, as the family's pipeline scales them); for the DiT families, the teacher's setup (DiTParts)."""

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


class DiTParts(PipelineParts):
    """The DiT adapters' (SD3, FLUX) teacher: built from its folder or from a pipeline already in memory (a bench's
    random full-size one), its frozen parts put in place, the flow process it was trained on. A family names its
    config section and how its crops align (`crop_multiple`: whole patches or token patches) and picks its sampler."""

    config_class: type  # the family's config section (SD3Config, FluxConfig)
    section: str  # its name in a config ("sd3", "flux")
    crop_multiple: int  # latent pixels a crop's side is a multiple of

    @classmethod
    def from_pipeline(cls, pipe, cfg=None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        adapter = cls.__new__(cls)
        adapter._setup(pipe, None, cfg or cls.config_class(), device, dtype)
        return adapter

    def teacher_sampler(self, cfg):
        return cfg.sampler

    def _setup(self, pipe, folder: Path | None, cfg, device, dtype) -> None:
        from ...errors import ConfigError

        self.cfg, self.pipe, self.folder = cfg, pipe, folder
        self.pipe.set_progress_bar_config(disable=True)
        self.teacher_unet = self.pipe.transformer  # the role's name in the method core: the frozen teacher
        self.vae = self.pipe.vae
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.sampler = self.teacher_sampler(cfg)
        self.vae_scale = self.pipe.vae_scale_factor
        multiple = self.vae_scale * self.crop_multiple
        if cfg.resolution % multiple:
            raise ConfigError(f"{self.section}.resolution {cfg.resolution} must be a multiple of {multiple} for this "
                              f"VAE and the transformer's {self.crop_multiple}x{self.crop_multiple} patches")
        self.latent_size = cfg.resolution // self.vae_scale
        for m in self.frozen_modules():
            m.requires_grad_(False).eval()
        self.to(device, dtype)

    @property
    def process(self):
        from ...method.diffusion import RectifiedFlow

        return RectifiedFlow(self.num_train_timesteps)
