"""SDXL adapter: the parts of a diffusers `StableDiffusionXLPipeline` folder (two CLIP text encoders,
pooled embeddings, micro-conditioning time_ids, VAE latents).

The teacher UNet can be replaced by a UNet weights file (how DMD2 ships) and can have a LoRA fused in
(how Hyper-SDXL ships). The null prompt is zero embeddings, pooled included (docs/method.md §3; SDXL's own
`force_zeros_for_empty_prompt`). The VAE only decodes, for viewing and evaluation.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ...errors import ConfigError, NitroFusionError, describe
from ...sampling.scheduler import config_for
from ...unet_weights import load_checked, read_weights, strip_prefixes
from ..adapter import Cond, ModelAdapter
from .config import SDXLConfig
from .family import SDXL, Family, check_pipeline_folder


@contextlib.contextmanager
def _quiet_transformers():
    """No per-file 'Loading weights' bars: a run's output is its own progress and errors."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def load_unet_weights(unet: UNet2DConditionModel, path: Path) -> None:
    """`sdxl.teacher_unet`: a replacement for the teacher folder's UNet (e.g. DMD2's 4-step UNet)."""
    load_checked(unet, strip_prefixes(read_weights(path)), f"UNet weights {path}", "the teacher's UNet",
                 "is it a diffusers-format SDXL UNet?")


def _component(cls, folder: Path):
    """cls.from_pretrained(folder), with a truncated or corrupt weights file (an interrupted download) as one
    line naming the folder."""
    try:
        return cls.from_pretrained(folder)
    except NitroFusionError:
        raise
    except Exception as e:  # noqa: BLE001 - loaders raise OSError, SafetensorError, ValueError... for a bad file
        raise NitroFusionError(f"cannot load {folder} as {cls.__name__} ({describe(e)}); the download may be "
                               "incomplete: fetch that folder again") from None


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


class SDXLAdapter(PipelineParts, ModelAdapter):
    family: Family = SDXL

    def __init__(self, folder: str | Path, cfg: SDXLConfig | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        folder = Path(folder)
        check_pipeline_folder(folder, self.family)
        tokenizers, encoders = self._load_text(folder)
        unet = _component(UNet2DConditionModel, folder / "unet")
        if unet.config.addition_embed_type != ("text_time" if self.family.text_time else None):
            raise NitroFusionError(f"{folder / 'unet'} is not {self.family.article} {self.family.label} UNet "
                                   f"(addition_embed_type is {unet.config.addition_embed_type!r})")
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.folder = folder
        self._setup(tokenizers, encoders, unet, _component(AutoencoderKL, folder / "vae"), scheduler_config,
                    cfg or SDXLConfig(), device, dtype)

    def _load_text(self, folder: Path) -> tuple[list, list]:
        """SDXL's two tokenizers and text encoders (CLIP ViT-L, and OpenCLIP bigG with its projection)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers = [_component(CLIPTokenizer, folder / name) for name in ("tokenizer", "tokenizer_2")]
        with _quiet_transformers():
            encoders = [_component(CLIPTextModel, folder / "text_encoder"),
                        _component(CLIPTextModelWithProjection, folder / "text_encoder_2")]
        return tokenizers, encoders

    @classmethod
    def from_components(cls, tokenizers: list, text_encoders: list, unet: UNet2DConditionModel, vae: AutoencoderKL,
                        scheduler_config: dict, cfg: SDXLConfig | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> SDXLAdapter:
        """From models already in memory (e.g. nitrofusion.testing's random full-size SDXL)."""
        self = cls.__new__(cls)
        self.folder = None
        self._setup(tokenizers, text_encoders, unet, vae, scheduler_config, cfg or SDXLConfig(), device, dtype)
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
            raise ConfigError(f"sdxl.resolution {cfg.resolution} must be a multiple of "
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

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """SDXL's prompt encoding: penultimate hidden states of both encoders, concatenated; pooled from
        the second (as StableDiffusionXLPipeline.encode_prompt with clip_skip=None)."""
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if out[0].ndim == 2:
                pooled = out[0]
        return {"prompt_embeds": torch.cat(states, dim=-1).float(), "text_embeds": pooled.float()}

    def null_cond(self, cond: Cond) -> Cond:
        return {k: torch.zeros_like(v) for k, v in cond.items()}

    def time_ids(self, x: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """Micro-conditioning (original size, crop top-left, target size) in pixels. A crop of the
        full sample is described as exactly that: the full size, the crop's corner, the crop's size [ours]."""
        s = self.vae_scale
        n, (h, w) = x.shape[0], x.shape[-2:]
        full = torch.tensor([self.latent_size * s, self.latent_size * s] if boxes is not None else [h * s, w * s])
        corner = boxes.cpu() * s if boxes is not None else torch.zeros(n, 2, dtype=torch.long)
        ids = torch.cat([full.expand(n, 2), corner, torch.tensor([h * s, w * s]).expand(n, 2)], dim=1)
        return ids.to(x.device, x.dtype)

    def _kwargs(self, x: torch.Tensor, cond: Cond, boxes, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"].to(dtype),
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"].to(dtype),
                                      "time_ids": self.time_ids(x, boxes).to(dtype)}}

    def unet_call(self, unet, x, t, cond):
        dtype = module_dtype(unet)
        return unet(x.to(dtype), t, **self._kwargs(x, cond, None, dtype)).sample

    def backbone_call(self, backbone, x, t, cond, boxes):
        dtype = module_dtype(backbone)
        return backbone(x.to(dtype), t, **self._kwargs(x, cond, boxes, dtype))
