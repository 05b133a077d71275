"""`nitrofusion bench --memory --family flux`: what a FLUX.1-dev run needs in accelerator memory, known before renting
a GPU: flux-dev-lora at 1024 px, the same run with T5 kept resident (what the T5 cache saves), and a FULL student
sharded with FSDP over each `--fsdp N` GPUs (per GPU; one GPU cannot hold a full 11.9B student).

The counting (training/memory.py) over FLUX.1-dev's FluxTransformer2DModel (worlds/flux/testing.py `FLUX_DEV`: 19
double-stream and 38 single-stream blocks of 24 x 128 heads) as the student, and its first `flux.backbone_blocks`
double-stream blocks as E (worlds/flux/backbone.py), on FLUX's packed tokens: 2x2 latent patches (4,096 image tokens
at 1024 px) beside `flux.max_sequence_length` T5 tokens (512); the crop tasks see whole 2x2 patches of
`adversarial.crop_fraction` of the side, as the adapter crops them (1,024 image tokens at 1024 px), with the same 512
text tokens. Frozen: CLIP-L in the run's precision, the VAE in fp32, and T5-XXL (4.8B parameters) only when it stays
resident: with `flux.t5_cache` (the default) its states come with the teacher pairs and `distill` releases it before
training (worlds/pipelines/t5_cache.py).

Cards: 80 GB and 48 GB are 74.5 and 44.7 GiB; a row fits a card when its total (a lower bound: no CUDA context, no
allocator slack) is below that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ... import config as config_lib
from ...distill_config import DistillConfig
from ...models.student import lora_parameter_count
from ...training.memory import (
    GiB,
    count_activations,
    flash_attention,
    format_parts,
    largest_block,
    numel,
    per_image_peaks,
    pool_parameters,
    step_activations,
    training_parts,
)

PRESET = "flux-dev-lora"
RUNS = ((PRESET, PRESET, []), (PRESET, PRESET, ["flux.t5_cache=false"]))
FULL = ("full flux-dev", ["student.kind=full"])  # the FSDP rows: a full student of the same recipe
CARDS = {"80 GB": 80e9, "48 GB": 48e9}  # H100 / A100 80GB; L40S / A6000 48GB (decimal gigabytes)


def transformer_meta(dtype: torch.dtype) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    from .testing import FLUX_DEV

    with torch.device("meta"):
        return nn.Module.to(FluxTransformer2DModel(**FLUX_DEV), dtype)  # nn's: diffusers warns


@contextlib.contextmanager
def _flash_attention() -> Iterator[None]:
    """training.memory.flash_attention for diffusers' attention dispatcher (FLUX's processor), which passes query,
    key and value by keyword."""
    with flash_attention():
        flash = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = (
            lambda query, key, value, *args, **kwargs: flash(query, key, value, *args, **kwargs))
        yield  # flash_attention restores torch's own on leaving


def activation_bytes(transformer: nn.Module, px: int, checkpointing: bool, backbone_blocks: int, taps: list[int],
                     t5_tokens: int, crop_fraction: float = 0.5) -> dict:
    """Per image: bytes autograd keeps for the student's forward (all double- and single-stream blocks), E's global
    and local forwards, and the largest checkpointed block's recomputation (0 without checkpointing)."""
    from . import backbone as backbone_mod
    from .tokens import ids

    dtype = next(transformer.parameters()).dtype
    cfg = transformer.config
    latent = px // 8
    crop = max(2, int(latent * crop_fraction) // 2 * 2)  # method/step.py crop_size with FLUX's crop_multiple 2

    def forward(run: str, size: int) -> None:
        with torch.device("meta"):  # the adapter's inputs (FluxAdapter._inputs) for one image
            tokens = torch.empty(1, (size // 2) ** 2, cfg.in_channels, dtype=dtype, requires_grad=True)
            t = torch.empty(1, dtype=dtype)
            guidance = torch.empty(1) if cfg.guidance_embeds else None
            context = torch.empty(1, t5_tokens, cfg.joint_attention_dim, dtype=dtype)
            pooled = torch.empty(1, cfg.pooled_projection_dim, dtype=dtype)
            txt_ids, img_ids = ids(size, size, t5_tokens, "meta", dtype)
        if run == "student":
            transformer(hidden_states=tokens, timestep=t, guidance=guidance, pooled_projections=pooled,
                        encoder_hidden_states=context, txt_ids=txt_ids, img_ids=img_ids)
        else:
            backbone_mod.FluxBackbone(transformer, backbone_blocks, taps, checkpointing)(
                tokens, t, guidance, pooled, context, txt_ids, img_ids, (size // 2, size // 2))

    sizes = {"student": latent, "backbone_global": latent, "backbone_local": crop}
    return count_activations(transformer, backbone_mod, sizes, checkpointing, forward, _flash_attention)


def frozen_parts_params() -> dict[str, int]:
    """Parameters of the frozen parts besides the transformer, counted on meta: CLIP-L, T5-XXL, the VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .testing import _VAE, FLUX_CLIP_L, FLUX_T5_XXL, FLUX_VAE

    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(**FLUX_CLIP_L, vocab_size=49408, max_position_embeddings=77))
        t5 = T5EncoderModel(T5Config(**FLUX_T5_XXL))
        vae = AutoencoderKL(**FLUX_VAE, **_VAE["full"])
    return {"clip": numel(clip), "t5": numel(t5), "vae": numel(vae)}


def fits(total: int) -> dict[str, bool]:
    """Which cards a predicted peak (bytes per GPU) fits: 80 GB and 48 GB."""
    return {card: total < size for card, size in CARDS.items()}


def run_memory(cfg: DistillConfig, transformer: nn.Module, frozen: dict[str, int], acts: dict | None = None,
               name: str = "", shards: int = 1) -> dict:
    """Bytes per part of one run `cfg` on `transformer` (meta-device) with frozen parts of `frozen` parameters, and
    its predicted peak per GPU at the run's micro-batch, resolution and checkpointing (`shards` > 1: the student
    sharded with FSDP over that many GPUs)."""
    f = cfg.flux
    params = numel(transformer)
    trainable = lora_parameter_count(transformer, cfg.student) if cfg.student.kind == "lora" else params
    heads = pool_parameters(cfg, [transformer.inner_dim] * len(f.taps))
    weight = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4
    others = {"CLIP-L + VAE (fp32)": weight * frozen["clip"] + 4 * frozen["vae"],
              "T5-XXL": 0 if f.t5_cache else weight * frozen["t5"]}
    frozen_params = params + sum(b.numel() for b in transformer.buffers())
    parts = training_parts(cfg, ("FLUX transformer", frozen_params), others, trainable, heads, shards,
                           largest_block(transformer))
    key = (f.resolution, cfg.gradient_checkpointing)
    a = (acts or {}).get(key) or activation_bytes(transformer, f.resolution, cfg.gradient_checkpointing,
                                                  f.backbone_blocks, f.taps, f.max_sequence_length,
                                                  cfg.adversarial.crop_fraction)
    activations = step_activations(cfg, a)
    total = sum(parts.values()) + activations
    label = name + ("" if f.t5_cache else ", T5 resident") + (f", FSDP x{shards}" if shards > 1 else "")
    return {"preset": label, "student": cfg.student.kind, "fsdp_processes": shards, "trainable_parameters": trainable,
            "pool_parameters": heads, "micro_batch": cfg.micro_batch, "resolution": f.resolution,
            "t5_cache": f.t5_cache, "gradient_checkpointing": cfg.gradient_checkpointing, "parts": parts,
            "activations": activations, "total": total, "fits": fits(total)}


def memory_model(overrides: list[str] | None = None, fsdp: tuple[int, ...] = ()) -> dict:
    """Bytes per part for flux-dev-lora (T5 cached, then resident) and for a full student under FSDP over each of
    `fsdp` GPU counts; activations per image at the preset's resolution (1024 px) with and without checkpointing; the
    predicted peak per GPU at each run's own micro-batch, resolution and checkpointing, and the cards it fits."""
    transformer = transformer_meta(torch.bfloat16)
    frozen = frozen_parts_params()
    cfgs = [(label, config_lib.build(DistillConfig, "distill", preset, [*sets, *(overrides or [])]))
            for label, preset, sets in RUNS]
    cfg = cfgs[0][1]
    f = cfg.flux
    acts = {(f.resolution, ck): activation_bytes(transformer, f.resolution, ck, f.backbone_blocks, f.taps,
                                                 f.max_sequence_length, cfg.adversarial.crop_fraction)
            for ck in (False, True)}
    rows = [run_memory(c, transformer, frozen, acts, label) for label, c in cfgs]
    if fsdp:
        full = config_lib.build(DistillConfig, "distill", PRESET, [*FULL[1], *(overrides or [])])
        rows += [run_memory(full, transformer, frozen, acts, FULL[0], n) for n in fsdp]
    per_image = per_image_peaks({f"{px}px, checkpointing {'on' if ck else 'off'}": v for (px, ck), v in acts.items()})
    return {"transformer_parameters": numel(transformer), "frozen_parameters": frozen, "rows": rows,
            "activations_per_image": per_image, "cards_gib": {card: size / GiB for card, size in CARDS.items()}}


def format_memory(result: dict) -> str:
    f = result["frozen_parameters"]
    text = format_parts(f"FLUX.1-dev transformer: {result['transformer_parameters'] / 1e9:.2f}B parameters; CLIP-L "
                        f"{f['clip'] / 1e9:.3f}B, T5-XXL {f['t5'] / 1e9:.2f}B (0 when its states are cached with the "
                        f"pairs: flux.t5_cache), VAE {f['vae'] / 1e9:.3f}B (meta-device counts); GiB per part", result)
    cards = ", ".join(f"{card} = {gib:.1f} GiB" for card, gib in result["cards_gib"].items())
    lines = ["", f"Which cards each run fits (its total per GPU, a lower bound, below the card's memory; {cards}):", ""]
    for r in result["rows"]:
        verdict = "; ".join(f"{'fits' if ok else 'does NOT fit'} {card}" for card, ok in r["fits"].items())
        per_gpu = " per GPU" if r["fsdp_processes"] > 1 else ""
        lines.append(f"- {r['preset']} ({r['student']}): {r['total'] / GiB:.1f} GiB{per_gpu}: {verdict}")
    return text + "\n" + "\n".join(lines)
