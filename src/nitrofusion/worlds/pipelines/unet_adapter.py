"""The UNet pipeline families' adapter (SDXL, SD 1.x/2.x): the parts of a diffusers pipeline folder the method
needs (docs/method.md §1-3). The teacher UNet can be replaced by a UNet weights file (how DMD2 ships) and can have a
LoRA fused in (how Hyper-SDXL ships). The VAE only decodes (and encodes real images), for viewing and evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ...errors import ConfigError, NitroFusionError
from ...method.adapter import Cond, ModelAdapter
from ...models.weights import load_checked, read_weights, strip_prefixes
from ...sampling.scheduler import config_for
from .config import PipelineConfig
from .family import Family, check_pipeline_folder
from .parts import PipelineParts, load_component, module_dtype


def load_unet_weights(unet: UNet2DConditionModel, path: Path) -> None:
    """`<family>.teacher_unet`: a replacement for the teacher folder's UNet (e.g. DMD2's 4-step UNet)."""
    load_checked(unet, strip_prefixes(read_weights(path)), f"UNet weights {path}", "the teacher's UNet",
                 "is it a diffusers-format UNet of this family?")



class UNetPipelineAdapter(PipelineParts, ModelAdapter):
    """A UNet family's pipeline folder as the method's adapter: teacher UNet (optionally replaced by a weights file
    or with a LoRA fused in), text encoders, VAE, scheduler. A family adds its prompt encoding, its null prompt and
    the UNet's extra inputs (`_load_text`, `encode_prompts`, `null_cond`, `_kwargs`)."""

    family: Family

    def __init__(self, folder: str | Path, cfg: PipelineConfig | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        folder = Path(folder)
        check_pipeline_folder(folder, self.family)
        tokenizers, encoders = self._load_text(folder)
        unet = load_component(UNet2DConditionModel, folder / "unet")
        if unet.config.addition_embed_type != ("text_time" if self.family.text_time else None):
            raise NitroFusionError(f"{folder / 'unet'} is not {self.family.article} {self.family.label} UNet "
                                   f"(addition_embed_type is {unet.config.addition_embed_type!r})")
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.folder = folder
        self._setup(tokenizers, encoders, unet, load_component(AutoencoderKL, folder / "vae"), scheduler_config,
                    cfg or self.family_config(), device, dtype)

    @classmethod
    def from_components(cls, tokenizers: list, text_encoders: list, unet: UNet2DConditionModel, vae: AutoencoderKL,
                        scheduler_config: dict, cfg: PipelineConfig | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> UNetPipelineAdapter:
        """From models already in memory (e.g. worlds/sdxl/testing.py's random full-size SDXL)."""
        self = cls.__new__(cls)
        self.folder = None
        self._setup(tokenizers, text_encoders, unet, vae, scheduler_config, cfg or self.family_config(), device, dtype)
        return self

    def _setup(self, tokenizers, text_encoders, unet, vae, scheduler_config, cfg, device, dtype) -> None:
        self.cfg, self.tokenizers, self.text_encoders, self.teacher_unet, self.vae = (
            cfg, tokenizers, text_encoders, unet, vae)
        if cfg.teacher_unet:
            load_unet_weights(self.teacher_unet, Path(cfg.teacher_unet))
        if cfg.teacher_lora:
            self._fuse_lora(Path(cfg.teacher_lora), cfg.lora_scale)
        for m in (*self.text_encoders, self.teacher_unet, self.vae):
            m.requires_grad_(False).eval()
        self.scheduler_config = dict(scheduler_config)
        sched = DDPMScheduler.from_config(config_for(DDPMScheduler, self.scheduler_config))
        self.alphas_cumprod = sched.alphas_cumprod.clone()
        self.num_train_timesteps = sched.config.num_train_timesteps
        self.prediction_type = sched.config.prediction_type
        self.sampler = cfg.sampler
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.crop_multiple = 2 ** (len(self.teacher_unet.config.block_out_channels) - 1)
        if cfg.resolution % (self.vae_scale * self.crop_multiple):
            raise ConfigError(f"{self.family.world}.resolution {cfg.resolution} must be a multiple of "
                              f"{self.vae_scale * self.crop_multiple} for this VAE and UNet")
        self.latent_size = cfg.resolution // self.vae_scale
        self.to(device, dtype)

    def _fuse_lora(self, path: Path, scale: float) -> None:
        from ...data.pairs import fingerprint  # per-tensor sums: no second copy of a 10 GB UNet to compare against

        if not path.exists():
            raise NitroFusionError(f"teacher LoRA not found: {path}")
        before = fingerprint(self.teacher_unet)
        unet = self.teacher_unet
        try:  # the family's own LoRA reader (kohya, PEFT and other layouts), then fused into the UNet
            state, alphas = self.family.pipeline_class().lora_state_dict(str(path), unet_config=unet.config)
            unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name="teacher")
            unet.fuse_lora(lora_scale=scale, adapter_names=["teacher"])
            unet.unload_lora()
        except Exception as e:  # noqa: BLE001 - diffusers/peft raise many types for a LoRA that does not fit
            raise NitroFusionError(f"LoRA {path} does not apply to this teacher "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if fingerprint(self.teacher_unet) == before:
            raise NitroFusionError(f"LoRA {path} changed no UNet weight: its keys match no module of this UNet "
                                   f"(is it {self.family.article} {self.family.label} LoRA?)")

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [*self.text_encoders, self.teacher_unet]

    def latent_shape(self) -> tuple[int, ...]:
        return (self.teacher_unet.config.in_channels, self.latent_size, self.latent_size)

    def unet_call(self, unet, x, t, cond):
        dtype = module_dtype(unet)
        return unet(x.to(dtype), t, **self._kwargs(x, cond, None, dtype)).sample

    def backbone_call(self, backbone, x, t, cond, boxes):
        dtype = module_dtype(backbone)
        return backbone(x.to(dtype), t, **self._kwargs(x, cond, boxes, dtype))

    def family_config(self) -> PipelineConfig:
        raise NotImplementedError

    def _load_text(self, folder: Path) -> tuple[list, list]:
        """The family's tokenizers and text encoders."""
        raise NotImplementedError

    def _kwargs(self, x: torch.Tensor, cond: Cond, boxes, dtype: torch.dtype) -> dict:
        """The UNet's inputs besides x and t: the prompt embeddings (and a family's micro-conditioning)."""
        raise NotImplementedError

    def save_lora(self, folder, factors, unet_config, rank, shift, alpha, metadata) -> None:
        from .export import save_lora_files

        save_lora_files(folder, factors, unet_config, rank, shift, alpha=alpha, metadata=metadata)
