"""One optimiser step (docs/method.md §4), the same for `distill`, `bench` and the step profile: sample the
active heads' micro-batches through the adversarial step (method/step.py), then both optimisers, the pool
refresh and the EMA. A step whose loss or student gradient is not finite on any rank changes no weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..method.adapter import Cond
from ..method.schedules import refine_probability, regression_on_refinements
from ..stopwatch import section
from .build import TrainParts
from .fsdp import full, local
from .optim import average_active_head_grads

Batch = tuple[torch.Tensor, torch.Tensor, Cond]  # x_T, the teacher's x0 (or a real image), conditioning


@dataclass
class StepOutcome:
    logs: dict[str, float]  # every loss, averaged over the micro-batches
    finite: bool  # False: the step was skipped
    nonfinite: set[tuple[str, int]] = field(default_factory=set)  # (task, t*) whose logits went bad
    refreshed: list[int] = field(default_factory=list)  # heads re-initialised after the step


def optimizer_step(parts: TrainParts, next_batch: Callable[[], Batch], gen: torch.Generator, grad_accum: int,
                   images: int, max_grad_norm: float = 0.0) -> StepOutcome:
    """One optimiser step after `images` training images: the method's schedules (method/schedules.py) are read at
    that point, so a resumed run takes the same steps."""
    acc, step_fn, student, pool, opt_g, opt_d, ema = (parts.acc, parts.step_fn, parts.student, parts.pool,
                                                      parts.opt_g, parts.opt_d, parts.ema)
    refine_p = refine_probability(step_fn.multistep, images)
    refine_regression = regression_on_refinements(step_fn.cfg, images)
    active = pool.sample_active()  # fixed for all micro-batches of this optimiser step
    logs: dict[str, float] = {}
    nonfinite: set[tuple[str, int]] = set()
    for micro in range(grad_accum):
        with section("data + prompt encoding"):
            x_T, x0, cond = next_batch()
        sync = micro == grad_accum - 1  # DDP all-reduces the student's gradients on the last micro-batch only
        # FSDP reduce-scatters after every micro-batch instead: skipping it would hold the whole unsharded gradient
        ctx = acc.no_sync(student) if not (sync or parts.fsdp) else _nullcontext()
        with ctx, acc.autocast():
            out = step_fn(x_T, x0, cond, active, gen, loss_scale=1.0 / grad_accum, refine_p=refine_p,
                          refine_regression=refine_regression)
        for k, v in out.items():
            logs[k] = logs.get(k, 0.0) + v / grad_accum
        nonfinite.update(step_fn.nonfinite)
    finite = all(math.isfinite(v) for v in logs.values())
    if finite and max_grad_norm == 0:  # a non-finite gradient with finite losses also skips the step
        grads = [local(p.grad) for p in student.parameters() if p.grad is not None]  # FSDP: this rank's shard
        finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    if acc.num_processes > 1:  # every rank must agree to skip, or the replicas drift apart
        flag = torch.tensor([0.0 if finite else 1.0], device=acc.device)
        finite = bool(acc.reduce(flag, reduction="sum").item() == 0)
        average_active_head_grads(acc, pool, active)
    if finite and max_grad_norm:
        if parts.fsdp:  # torch's own clip takes sharded gradients: the norm is over the whole student
            norm = full(torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm))
        else:
            norm = acc.clip_grad_norm_(student.parameters(), max_grad_norm)
        finite = bool(torch.isfinite(torch.as_tensor(norm)))
    with section("optimisers"):
        if finite:
            opt_g.step()
            opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
    with section("pool refresh"):
        refreshed = pool.refresh(opt_d)
    if ema is not None and finite:
        ema.update(acc.unwrap_model(student))
    return StepOutcome(logs, finite, nonfinite, refreshed)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
