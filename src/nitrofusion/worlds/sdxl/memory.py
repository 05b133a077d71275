"""`nitrofusion bench --memory`: what an SDXL run needs in accelerator memory, known before renting a GPU.

Weights, gradients, optimiser state and the head pool are counted exactly from the full-size architectures
built on the meta device (shapes only: no memory, no weights). Activations are the tensors autograd keeps for
the backward, counted with saved-tensor hooks over one forward of the full-size SDXL UNet (the student) and
its backbone E on the meta device, at 1024 and 512 px, with and without gradient checkpointing. Attention is
counted as a GPU's flash / memory-efficient kernel keeps it (q, k, v, output, log-sum-exp), not as the CPU's
math path (which would keep the N x N scores). Activations are counted in bf16 throughout; autocast keeps a
few (group-norm statistics, softmax inputs) in fp32, and the CUDA context and allocator slack (typically
0.5-2 GB) are not included: the model's totals are lower bounds to compare against a measured peak.

One adversarial micro-step holds, at its peak (method/step.py): the student's graph for the whole micro-batch,
plus ONE backbone call's graph (a separable loss frees each call's graph after its own backward): the global
task at the full latent size, or both local tasks on crops of `crop_fraction` of the side (they share one
call: AdversarialStep.task_groups).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ... import config as config_lib
from ...distill_config import DistillConfig
from ...models.student import lora_parameter_count

GiB = 1024**3
PRESETS = ("sdxl-realism", "sdxl-realism-lora", "sdxl-vibrant", "sdxl-vibrant-lora")
OPTIM_BYTES = {"adamw": 8, "adamw8bit": 2}  # AdamW state per trainable parameter: two fp32 moments, or 8-bit


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


class SavedBytes:
    """Bytes of distinct storages autograd saves for the backward, parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.seen, self.total = exclude, set(), 0

    def add(self, t: torch.Tensor) -> None:
        key, nbytes = _storage(t)
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.total += nbytes

    @contextlib.contextmanager
    def hooks(self) -> Iterator[SavedBytes]:
        def pack(t):
            self.add(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self


class _FlashAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for its backward: q, k, v, the output and a fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the model only counts
        raise NotImplementedError


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _FlashAttention.apply(q, k, v)


def _map_tensors(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple | list):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


class CheckpointCounter:
    """Stands in for torch's checkpoint while counting: a checkpointed block keeps only its inputs (counted
    outside), and its recomputation in the backward briefly holds its whole graph (the largest is the
    recompute peak). Its outputs re-enter the outer graph as fresh leaves, like a real checkpoint's."""

    def __init__(self, outer: SavedBytes) -> None:
        self.outer, self.peak = outer, 0

    def __call__(self, fn: Callable, *args, use_reentrant: bool | None = None, **kwargs):
        for a in (*args, *kwargs.values()):
            _map_tensors(a, lambda t: self.outer.add(t) if t.requires_grad or not t.is_leaf else None)
        inner = SavedBytes(self.outer.exclude)
        with inner.hooks():
            out = fn(*args, **kwargs)
        self.peak = max(self.peak, inner.total)
        return _map_tensors(out, lambda t: t.detach().requires_grad_(t.is_floating_point()))


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
    exclude = {_storage(p)[0] for p in unet.parameters()}
    latent = px // 8
    out = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    original_checkpoint = backbone_mod.checkpoint
    peaks = []
    try:
        torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
        for name, size, run in (("student", latent, "unet"), ("backbone_global", latent, "backbone"),
                                ("backbone_local", max(4, int(latent * crop_fraction) // 4 * 4), "backbone")):
            counter = SavedBytes(exclude)
            ckpt = CheckpointCounter(counter)
            backbone_mod.checkpoint = ckpt
            unet.requires_grad_(run == "unet")  # the student trains (full; a LoRA's saves nearly the same); E is frozen
            if checkpointing and run == "unet":
                unet.enable_gradient_checkpointing(gradient_checkpointing_func=ckpt)
            with torch.device("meta"):
                x = torch.empty(1, 4, size, size, dtype=dtype, requires_grad=True)
                t = torch.tensor([249])
            ehs, added = _cond(unet, 1, px, dtype)
            with counter.hooks():
                if run == "unet":
                    unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added)
                else:
                    backbone_mod.UNetBackbone(unet, checkpointing)(x, t, ehs, added)
            if checkpointing and run == "unet":
                unet.disable_gradient_checkpointing()
            out[name] = counter.total
            peaks.append(ckpt.peak)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        backbone_mod.checkpoint = original_checkpoint
    out["recompute_peak"] = max(peaks)
    return out


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    return {"text_encoders": 2 * sum(_numel(m) for m in text), "vae": 4 * _numel(vae)}


def pool_parameters(cfg: DistillConfig, unet: nn.Module) -> int:
    from ...method.backbone import level_channels
    from ...method.pool import HeadPool

    with torch.device("meta"):
        return _numel(HeadPool(cfg.pool, level_channels(unet)))


def run_memory(cfg: DistillConfig, unet: nn.Module, frozen: dict, acts: dict | None = None, name: str = "") -> dict:
    """Bytes per part of one run `cfg` on `unet` (a meta-device UNet) with frozen text encoders and VAE of `frozen`
    bytes, and its predicted peak at the run's micro-batch, resolution and checkpointing."""
    unet_params = _numel(unet)
    trainable = lora_parameter_count(unet, cfg.student) if cfg.student.kind == "lora" else unet_params
    weight_bytes = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4
    heads = pool_parameters(cfg, unet)
    parts = {
        "frozen UNet (teacher = E)": weight_bytes * unet_params,
        "text encoders + VAE": frozen["text_encoders"] + frozen["vae"],
        "student weights (fp32)": 4 * trainable,
        "student gradients": 4 * trainable,
        "student optimiser state": OPTIM_BYTES[cfg.student_optim.kind] * trainable,
        # every head keeps weights and (once trained) AdamW state; only the active share has gradients
        "head pool (weights, AdamW, active grads)": (4 + OPTIM_BYTES[cfg.heads_optim.kind]) * heads
        + 4 * heads // (cfg.pool.heads_per_slot if cfg.pool.dynamic else 1),
    }
    if cfg.ema_decay > 0:
        parts["student EMA (fp32)"] = 4 * trainable
    if weight_bytes == 2:
        # autocast casts each fp32 weight to half precision once per forward and keeps the copy until the
        # autocast region ends (found on an H100: the measured peak at micro-batch 2 was ~5 GiB above the
        # model without this term, the size of the student's bf16 copy)
        parts["student half-precision copies (autocast cache)"] = 2 * trainable
    px = cfg.sdxl.resolution
    a = (acts or {}).get((px, cfg.gradient_checkpointing)) or activation_bytes(unet, px, cfg.gradient_checkpointing)
    crop_tasks = sum(task != "global_cond" for task in cfg.pool.tasks)
    per_image = a["student"] + max(a["backbone_global"], crop_tasks * a["backbone_local"])
    activations = cfg.micro_batch * per_image + a["recompute_peak"] * cfg.micro_batch
    return {"preset": name, "student": cfg.student.kind, "trainable_parameters": trainable,
            "pool_parameters": heads, "micro_batch": cfg.micro_batch, "resolution": px,
            "gradient_checkpointing": cfg.gradient_checkpointing, "parts": parts,
            "activations": activations, "total": sum(parts.values()) + activations}


def memory_model(presets: tuple[str, ...] = PRESETS, overrides: list[str] | None = None) -> dict:
    """Bytes per part for each preset; activations per image at 1024 and 512 px, with and without checkpointing;
    the predicted peak at the preset's own micro-batch, resolution and checkpointing."""
    unet = _sdxl_unet_meta(torch.bfloat16)
    frozen = _frozen_parts_bytes()
    acts = {(px, ck): activation_bytes(unet, px, ck) for px in (1024, 512) for ck in (False, True)}
    rows = [run_memory(config_lib.build(DistillConfig, "distill", name, list(overrides or [])), unet, frozen, acts,
                       name) for name in presets]
    per_image = {f"{px}px, checkpointing {'on' if ck else 'off'}": {
        "student": v["student"], "backbone_global": v["backbone_global"], "backbone_local": v["backbone_local"],
        "recompute_peak": v["recompute_peak"],
        "per_image_peak": v["student"] + max(v["backbone_global"], 2 * v["backbone_local"]) + v["recompute_peak"]}
        for (px, ck), v in acts.items()}
    return {"unet_parameters": _numel(unet), "rows": rows, "activations_per_image": per_image}


def format_memory(result: dict) -> str:
    def gib(b: float) -> str:
        return f"{b / GiB:.2f}"

    rows = result["rows"]
    names = list(dict.fromkeys(n for r in rows for n in r["parts"]))
    lines = [f"SDXL UNet: {result['unet_parameters'] / 1e9:.2f}B parameters (meta-device count); GiB per part",
             "", "| part | " + " | ".join(f"{r['preset']} ({r['student']})" for r in rows) + " |",
             "|---|" + "---:|" * len(rows)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(gib(r["parts"].get(n, 0)) for r in rows) + " |")
    lines.append("| activations (micro-batch x per-image peak) | " + " | ".join(
        f"{gib(r['activations'])} (x{r['micro_batch']}, {r['resolution']}px, ckpt "
        f"{'on' if r['gradient_checkpointing'] else 'off'})" for r in rows) + " |")
    lines.append("| **total (lower bound)** | " + " | ".join(f"**{gib(r['total'])}**" for r in rows) + " |")
    lines += ["", "Activations per image, GiB (student forward + the larger backbone call, the global task or the "
              "two local tasks together, + one checkpointed block's recomputation):", "",
              "| setting | student | E global | E local (one task) | recompute | peak |",
              "|---|---:|---:|---:|---:|---:|"]
    for k, v in result["activations_per_image"].items():
        lines.append(f"| {k} | {gib(v['student'])} | {gib(v['backbone_global'])} | {gib(v['backbone_local'])} | "
                     f"{gib(v['recompute_peak'])} | {gib(v['per_image_peak'])} |")
    return "\n".join(lines)
