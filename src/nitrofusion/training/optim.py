"""The optimisers of a run: AdamW, 8-bit AdamW or ZeRO-1 (docs/method.md §4), the student's EMA, and the
head pool's gradient average across processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from ..errors import NitroFusionError
from ..method.pool import HeadPool
from ..models import student as student_lib


def adamw(params, o, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW); `sharded`: ZeRO stage 1, each rank keeps the optimiser state of
    its share of the parameters (torch's ZeroRedundancyOptimizer) and broadcasts its updated share. `params`:
    tensors, or param groups whose "lr_scale" multiplies the config's lr (`set_learning_rates`)."""
    cls = torch.optim.AdamW
    if o.kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise NitroFusionError("optimiser kind 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                                   "(GPU), or set kind=adamw") from None
        cls = bnb.optim.AdamW8bit
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "lr": o.lr * g.get("lr_scale", 1.0)} for g in params if g["params"]]
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    kw = {"lr": o.lr, "betas": tuple(float(b) for b in o.betas), "weight_decay": o.weight_decay}
    if o.kind == "adamw" and tensors and all(p.device.type in ("cpu", "cuda") for p in tensors):
        kw["fused"] = True  # one kernel over all tensors, not a Python loop per tensor: 3x faster on the mini student
    if tensors and type(tensors[0]).__name__ == "DTensor" and tensors[0].device.type == "cpu":
        # FSDP's shards on CPUs: DTensor's sharding rule for one fused call over every tensor took 5 s to derive
        # (once per process), the per-tensor loop's rules are cached by shape; on a GPU the fused kernel stays
        kw.pop("fused", None)
        kw["foreach"] = False
    if sharded:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kw)
    return cls(params, **kw)


def set_learning_rates(pairs: list[tuple[torch.optim.Optimizer, object]], images: int, max_images: int) -> None:
    """Each optimiser's lr for the step that starts after `images` training images: its config's lr, or
    on the `linear` schedule lr * (1 - images / max_images), which reaches 0 at the budget's end. A
    function of the images done only, so a resumed run takes the same line."""
    for opt, o in pairs:
        lr = o.lr * max(0.0, 1.0 - images / max_images) if o.schedule == "linear" else o.lr
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


class EMA:
    """EMA of the trainable weights (a LoRA student: its adapters only), in fp32."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in student_lib.trainable_state(module).items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in student_lib.trainable_state(module).items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1 - self.decay)


def average_active_head_grads(acc: Accelerator, pool: HeadPool, active: torch.Tensor) -> None:
    """The pool is not DDP-wrapped: average the active heads' gradients over ranks in one collective.
    Every rank sends the same parameter list (a head its micro-batch did not reach sends zeros), so the
    collectives line up even when a rank had no sample at some t*."""
    params = [p for i in pool.active_indices(active) for p in pool.heads[i].parameters()]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = acc.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="mean")
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
