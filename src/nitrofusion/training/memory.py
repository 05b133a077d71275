"""What a training run holds in accelerator memory, counted before renting a GPU (`nitrofusion bench --memory`; each
family's memory model, worlds/*/memory.py, builds on this).

Weights, gradients, optimiser state and the head pool are counted exactly from full-size architectures built on the
meta device (shapes only: no memory, no weights). Activations are the tensors autograd keeps for the backward,
counted with saved-tensor hooks over one meta-device forward of the student and of its backbone E (`SavedBytes`).
Attention is counted as a GPU's flash / memory-efficient kernel keeps it (q, k, v, output, log-sum-exp:
`flash_attention`), not as the CPU's math path (which would keep the N x N scores). A checkpointed block keeps only
its inputs, and its recomputation in the backward briefly holds its whole graph (`CheckpointCounter`). Activations
are counted in bf16; autocast keeps a few in fp32, and the CUDA context and allocator slack (typically 0.5-2 GB) are
not included: the totals are lower bounds to compare against a measured peak.

One adversarial micro-step holds, at its peak (method/step.py): the student's graph for the whole micro-batch, plus
ONE backbone call's graph (a separable loss frees each call's graph after its own backward): the global task at the
full latent size, or both local tasks on crops of `crop_fraction` of the side (they share one call:
AdversarialStep.task_groups).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..distill_config import DistillConfig

GiB = 1024**3
OPTIM_BYTES = {"adamw": 8, "adamw8bit": 2}  # AdamW state per trainable parameter: two fp32 moments, or 8-bit


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of a tensor's storage: views of one storage count once."""
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SavedBytes:
    """Bytes of distinct storages autograd saves for the backward, parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.seen, self.total = exclude, set(), 0

    def add(self, t: torch.Tensor) -> None:
        key, nbytes = storage_key(t)
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


@contextlib.contextmanager
def flash_attention() -> Iterator[None]:
    """Every scaled_dot_product_attention counted as a fused GPU kernel keeps it."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


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


def count_activations(model: nn.Module, backbone_module, sizes: dict[str, int], checkpointing: bool,
                     forward: Callable[[str, int], object], attention=flash_attention) -> dict:
    """Per image, for every family: the bytes autograd keeps for each run in `sizes` ("student": the student's
    forward; the others, E's global and local forwards, latents of that side), and "recompute_peak", the largest
    checkpointed block's recomputation (0 without checkpointing). `forward(run, size)` runs one of them on the meta
    device ("student" or "backbone"); `backbone_module.checkpoint` is the counter while it runs."""
    exclude = {storage_key(p)[0] for p in model.parameters()}
    out, peaks = {}, []
    original_checkpoint = backbone_module.checkpoint
    try:
        for name, size in sizes.items():
            run = "student" if name == "student" else "backbone"
            counter = SavedBytes(exclude)
            ckpt = CheckpointCounter(counter)
            backbone_module.checkpoint = ckpt
            model.requires_grad_(run == "student")  # a LoRA student's saves nearly the same; E is frozen
            if checkpointing and run == "student":
                model.enable_gradient_checkpointing(gradient_checkpointing_func=ckpt)
            with counter.hooks(), attention():
                forward(run, size)
            if checkpointing and run == "student":
                model.disable_gradient_checkpointing()
            out[name] = counter.total
            peaks.append(ckpt.peak)
    finally:
        backbone_module.checkpoint = original_checkpoint
    out["recompute_peak"] = max(peaks)
    return out


def pool_parameters(cfg: DistillConfig, channels: list[int]) -> int:
    """Parameters of the run's whole head pool on E's feature levels of `channels`."""
    from ..method.pool import HeadPool

    with torch.device("meta"):
        return numel(HeadPool(cfg.pool, channels))


def largest_block(model: nn.Module) -> int:
    """Parameters of the largest unit FSDP gathers at once (training/fsdp.py `units`)."""
    from .fsdp import largest_unit

    return largest_unit(model)


def training_parts(cfg: DistillConfig, denoiser: tuple[str, int], frozen: dict[str, int], trainable: int,
                   heads: int, shards: int = 1, block: int = 0) -> dict[str, int]:
    """Bytes per part of a run besides activations, on one GPU: the frozen denoiser (teacher = E, `denoiser` = its
    name and parameter count) in the run's precision, the other frozen parts (`frozen`, bytes), the student's fp32
    weights, gradients and optimiser state, the head pool, the EMA and autocast's half-precision copies. `shards`
    > 1: FSDP over that many GPUs (training/fsdp.py): each keeps 1/shards of the student's weights, gradients,
    optimiser state and EMA, and gathers one block (`block` parameters) at a time, prefetching the next."""
    weight_bytes = 2 if cfg.mixed_precision in ("bf16", "fp16") else 4
    name, params = denoiser
    share = trainable // shards
    parts = {
        f"frozen {name} (teacher = E)": weight_bytes * params,
        **frozen,
        "student weights (fp32)": 4 * share,
        "student gradients": 4 * share,
        "student optimiser state": OPTIM_BYTES[cfg.student_optim.kind] * share,
        # every head keeps weights and (once trained) AdamW state; only the active share has gradients
        "head pool (weights, AdamW, active grads)": (4 + OPTIM_BYTES[cfg.heads_optim.kind]) * heads
        + 4 * heads // (cfg.pool.heads_per_slot if cfg.pool.dynamic else 1),
    }
    if cfg.ema_decay > 0:
        parts["student EMA (fp32)"] = 4 * share
    if shards > 1:  # the gathered block and the prefetched next one, in the gather dtype; no autocast copy kept
        parts["FSDP: gathered blocks (this one and the next)"] = 2 * weight_bytes * block
    elif weight_bytes == 2:
        # autocast casts each fp32 weight to half precision once per forward and keeps the copy until the
        # autocast region ends (found on an H100: the measured peak at micro-batch 2 was ~5 GiB above the
        # model without this term, the size of the student's bf16 copy)
        parts["student half-precision copies (autocast cache)"] = 2 * trainable
    return parts


def step_activations(cfg: DistillConfig, per_image: dict[str, int]) -> int:
    """Activation bytes at a micro-step's peak: micro_batch x (student + the larger backbone call, the global task or
    the crop tasks together + one checkpointed block's recomputation), from one image's counts."""
    crop_tasks = sum(task != "global_cond" for task in cfg.pool.tasks)
    a = per_image
    return cfg.micro_batch * (a["student"] + max(a["backbone_global"], crop_tasks * a["backbone_local"])
                              + a["recompute_peak"])


def per_image_peaks(acts: dict) -> dict:
    """The per-image activation table of a memory model: each setting's parts and its peak (two crop tasks)."""
    return {label: {**v, "per_image_peak": v["student"] + max(v["backbone_global"], 2 * v["backbone_local"])
                    + v["recompute_peak"]} for label, v in acts.items()}


def format_parts(title: str, result: dict) -> str:
    """A memory model's tables: GiB per part and preset, then activations per image and setting."""
    def gib(b: float) -> str:
        return f"{b / GiB:.2f}"

    rows = result["rows"]
    names = list(dict.fromkeys(n for r in rows for n in r["parts"]))
    lines = [title, "", "| part | " + " | ".join(f"{r['preset']} ({r['student']})" for r in rows) + " |",
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
