"""`nitrofusion bench --memory --family sd3`: what an SD3.5 medium run needs in accelerator memory, known before
renting a GPU (sd35-medium and sd35-medium-lora at 1024 px, and the LoRA run with T5 kept resident to show what the
T5 cache saves).

The counting (training/memory.py) over SD3.5 medium's MMDiT-X as the student and its first `sd3.backbone_blocks`
blocks as E (worlds/sd3/backbone.py), with SD3's token sequence: 77 CLIP tokens and `sd3.max_sequence_length` T5
tokens beside the 64 x 64 patch grid of a 1024 px image. Frozen: CLIP-L and CLIP-G in the run's precision, the VAE
in fp32, and T5-XXL (4.8B parameters) only when it stays resident: with `sd3.t5_cache` (the default) its states come
with the teacher pairs and `distill` releases it before training (data/text_cache.py).
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

RUNS = (("sd35-medium", []), ("sd35-medium-lora", []), ("sd35-medium-lora", ["sd3.t5_cache=false"]))
CLIP_TOKENS = 77


def transformer_meta(dtype: torch.dtype) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    from .testing import SD35_MEDIUM

    with torch.device("meta"):
        return nn.Module.to(SD3Transformer2DModel(**SD35_MEDIUM), dtype)  # nn's: diffusers warns


def activation_bytes(transformer: nn.Module, px: int, checkpointing: bool, backbone_blocks: int, taps: list[int],
                     t5_tokens: int, crop_fraction: float = 0.5) -> dict:
    """Per image: bytes autograd keeps for the student's forward, E's global and local forwards, and the largest
    checkpointed block's recomputation (0 without checkpointing)."""
    from . import backbone as backbone_mod

    dtype = next(transformer.parameters()).dtype
    latent, patch = px // 8, transformer.config.patch_size
    cfg = transformer.config

    def forward(run: str, size: int) -> None:
        with torch.device("meta"):
            x = torch.empty(1, cfg.in_channels, size, size, dtype=dtype, requires_grad=True)
            t = torch.tensor([249])
            context = torch.empty(1, CLIP_TOKENS + t5_tokens, cfg.joint_attention_dim, dtype=dtype)
            pooled = torch.empty(1, cfg.pooled_projection_dim, dtype=dtype)
        if run == "student":
            transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled)
        else:
            backbone_mod.DiTBackbone(transformer, backbone_blocks, taps, checkpointing)(x, t, context, pooled)

    sizes = {"student": latent, "backbone_global": latent,
             "backbone_local": max(patch, int(latent * crop_fraction) // patch * patch)}
    return count_activations(transformer, backbone_mod, sizes, checkpointing, forward)


def frozen_parts_params() -> dict[str, int]:
    """Parameters of the frozen parts besides the MMDiT, counted on meta: CLIP-L + CLIP-G, T5-XXL, the VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .testing import _VAE, CLIP_G, CLIP_L, T5_XXL

    ids = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        clip = [CLIPTextModelWithProjection(CLIPTextConfig(**c, **ids)) for c in (CLIP_L, CLIP_G)]
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",)
                            * 4, up_block_types=("UpDecoderBlock2D",) * 4, **_VAE["full"])
    return {"clip": sum(numel(m) for m in clip), "t5": numel(t5), "vae": numel(vae)}


def run_memory(cfg: DistillConfig, transformer: nn.Module, frozen: dict[str, int], acts: dict | None = None,
               name: str = "", shards: int = 1) -> dict:
    """Bytes per part of one run `cfg` on `transformer` (meta-device) with frozen parts of `frozen` parameters, and
    its predicted peak per GPU at the run's micro-batch, resolution and checkpointing (`shards` > 1: a full student
    under FSDP over that many GPUs)."""
    s = cfg.sd3
    params = numel(transformer)
    trainable = lora_parameter_count(transformer, cfg.student) if cfg.student.kind == "lora" else params
    heads = pool_parameters(cfg, [transformer.inner_dim] * len(s.taps))
    weight = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4
    others = {"CLIP-L + CLIP-G + VAE (fp32)": weight * frozen["clip"] + 4 * frozen["vae"],
              "T5-XXL": 0 if s.t5_cache else weight * frozen["t5"]}
    frozen_params = params + sum(b.numel() for b in transformer.buffers())  # with its 2-D position table
    parts = training_parts(cfg, ("MMDiT", frozen_params), others, trainable, heads, shards,
                           largest_block(transformer))
    key = (s.resolution, cfg.gradient_checkpointing)
    a = (acts or {}).get(key) or activation_bytes(transformer, s.resolution, cfg.gradient_checkpointing,
                                                  s.backbone_blocks, s.taps, s.max_sequence_length)
    activations = step_activations(cfg, a)
    label = name + ("" if s.t5_cache else ", T5 resident") + (f", FSDP x{shards}" if shards > 1 else "")
    return {"preset": label, "student": cfg.student.kind, "fsdp_processes": shards, "trainable_parameters": trainable,
            "pool_parameters": heads,
            "micro_batch": cfg.micro_batch, "resolution": s.resolution, "t5_cache": s.t5_cache,
            "gradient_checkpointing": cfg.gradient_checkpointing, "parts": parts, "activations": activations,
            "total": sum(parts.values()) + activations}


def memory_model(overrides: list[str] | None = None, fsdp: tuple[int, ...] = ()) -> dict:
    """Bytes per part for each run of RUNS (and the full one under FSDP over each of `fsdp` GPU counts); activations
    per image at 1024 and 512 px, with and without checkpointing; the predicted peak per GPU at each run's own
    micro-batch, resolution and checkpointing."""
    transformer = transformer_meta(torch.bfloat16)
    frozen = frozen_parts_params()
    cfgs = [(name, config_lib.build(DistillConfig, "distill", name, [*sets, *(overrides or [])]))
            for name, sets in RUNS]
    s = cfgs[0][1].sd3
    acts = {(px, ck): activation_bytes(transformer, px, ck, s.backbone_blocks, s.taps, s.max_sequence_length)
            for px in (1024, 512) for ck in (False, True)}
    rows = [run_memory(cfg, transformer, frozen, acts, name) for name, cfg in cfgs]
    rows += [run_memory(cfgs[0][1], transformer, frozen, acts, cfgs[0][0], n) for n in fsdp]  # the full student
    per_image = per_image_peaks({f"{px}px, checkpointing {'on' if ck else 'off'}": v for (px, ck), v in acts.items()})
    return {"transformer_parameters": numel(transformer), "frozen_parameters": frozen, "rows": rows,
            "activations_per_image": per_image}


def format_memory(result: dict) -> str:
    f = result["frozen_parameters"]
    return format_parts(f"SD3.5 medium MMDiT-X: {result['transformer_parameters'] / 1e9:.2f}B parameters; CLIP-L + "
                        f"CLIP-G {f['clip'] / 1e9:.2f}B, T5-XXL {f['t5'] / 1e9:.2f}B (0 when its states are cached "
                        "with the pairs: sd3.t5_cache), VAE {:.3f}B (meta-device counts); GiB per part".format(
                            f["vae"] / 1e9), result)
