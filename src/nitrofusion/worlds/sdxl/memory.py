"""`nitrofusion bench --memory`: what an SDXL run needs in accelerator memory, known before renting a GPU.

The counting (training/memory.py) over the full-size SDXL UNet as the student and its encoder as E, at 1024 and
512 px, with and without gradient checkpointing; the text encoders in the run's precision and the VAE in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import config as config_lib
from ...distill_config import DistillConfig
from ...models.student import lora_parameter_count
from ...training.memory import (
    count_activations,
    format_parts,
    largest_block,
    numel,
    per_image_peaks,
    pool_parameters,
    step_activations,
    training_parts,
)

PRESETS = ("sdxl-realism", "sdxl-realism-lora", "sdxl-vibrant", "sdxl-vibrant-lora")


def _sdxl_unet_meta(dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    from .testing import sdxl_unet_config

    with torch.device("meta"):
        return nn.Module.to(UNet2DConditionModel(**sdxl_unet_config("full")), dtype)  # nn's: diffusers warns


def _cond(unet, n: int, px: int, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    with torch.device("meta"):
        return (torch.empty(n, 77, cfg.cross_attention_dim, dtype=dtype),
                {"text_embeds": torch.empty(n, pooled, dtype=dtype),
                 "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * n, dtype=dtype)})


def activation_bytes(unet: nn.Module, px: int, checkpointing: bool, crop_fraction: float = 0.5) -> dict:
    """Per image: bytes autograd keeps for the student's forward, the backbone's global and local forwards,
    and the largest checkpointed block's recomputation (0 without checkpointing)."""
    from ...method import backbone as backbone_mod

    dtype = next(unet.parameters()).dtype
    latent = px // 8
    ehs, added = _cond(unet, 1, px, dtype)

    def forward(run: str, size: int) -> None:
        with torch.device("meta"):
            x = torch.empty(1, 4, size, size, dtype=dtype, requires_grad=True)
            t = torch.tensor([249])
        if run == "student":
            unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added)
        else:
            backbone_mod.UNetBackbone(unet, checkpointing)(x, t, ehs, added)

    crop = max(4, int(latent * crop_fraction) // 4 * 4)
    sizes = {"student": latent, "backbone_global": latent, "backbone_local": crop}
    return count_activations(unet, backbone_mod, sizes, checkpointing, forward)


def _frozen_parts_bytes() -> dict:
    """Text encoders (in the run's bf16) and the VAE (fp32: SDXL's overflows in fp16), counted on meta."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .testing import _TEXT, _VAE

    ids = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        text = [CLIPTextModel(CLIPTextConfig(**_TEXT["full"][0], **ids)),
                CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT["full"][1], **ids))]
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            **_VAE["full"])
    return {"text_encoders": 2 * sum(numel(m) for m in text), "vae": 4 * numel(vae)}


def run_memory(cfg: DistillConfig, unet: nn.Module, frozen: dict, acts: dict | None = None, name: str = "",
               shards: int = 1) -> dict:
    """Bytes per part of one run `cfg` on `unet` (a meta-device UNet) with frozen text encoders and VAE of `frozen`
    bytes, and its predicted peak per GPU at the run's micro-batch, resolution and checkpointing (`shards` > 1: a
    full student under FSDP over that many GPUs)."""
    from ...method.backbone import level_channels

    unet_params = numel(unet)
    trainable = lora_parameter_count(unet, cfg.student) if cfg.student.kind == "lora" else unet_params
    heads = pool_parameters(cfg, level_channels(unet))
    parts = training_parts(cfg, ("UNet", unet_params), {"text encoders + VAE": frozen["text_encoders"] + frozen["vae"]},
                           trainable, heads, shards, largest_block(unet))
    px = cfg.sdxl.resolution
    a = (acts or {}).get((px, cfg.gradient_checkpointing)) or activation_bytes(unet, px, cfg.gradient_checkpointing)
    activations = step_activations(cfg, a)
    return {"preset": name + (f", FSDP x{shards}" if shards > 1 else ""), "student": cfg.student.kind,
            "fsdp_processes": shards, "trainable_parameters": trainable,
            "pool_parameters": heads, "micro_batch": cfg.micro_batch, "resolution": px,
            "gradient_checkpointing": cfg.gradient_checkpointing, "parts": parts,
            "activations": activations, "total": sum(parts.values()) + activations}


def memory_model(presets: tuple[str, ...] = PRESETS, overrides: list[str] | None = None,
                 fsdp: tuple[int, ...] = ()) -> dict:
    """Bytes per part for each preset (and each full one under FSDP over each of `fsdp` GPU counts); activations per
    image at 1024 and 512 px, with and without checkpointing; the predicted peak per GPU at the preset's own
    micro-batch, resolution and checkpointing."""
    unet = _sdxl_unet_meta(torch.bfloat16)
    frozen = _frozen_parts_bytes()
    acts = {(px, ck): activation_bytes(unet, px, ck) for px in (1024, 512) for ck in (False, True)}
    cfgs = {name: config_lib.build(DistillConfig, "distill", name, list(overrides or [])) for name in presets}
    rows = [run_memory(cfg, unet, frozen, acts, name) for name, cfg in cfgs.items()]
    rows += [run_memory(cfg, unet, frozen, acts, name, n) for n in fsdp for name, cfg in cfgs.items()
             if cfg.student.kind == "full"]
    per_image = per_image_peaks({f"{px}px, checkpointing {'on' if ck else 'off'}": v for (px, ck), v in acts.items()})
    return {"unet_parameters": numel(unet), "rows": rows, "activations_per_image": per_image}


def format_memory(result: dict) -> str:
    return format_parts(f"SDXL UNet: {result['unet_parameters'] / 1e9:.2f}B parameters (meta-device count); GiB per "
                        "part", result)
