"""The method's config sections (discriminator pool, adversarial step, multi-step stage), kept free of torch so
that a config can be read and checked in a fraction of a second, before any model library loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import ranged
from ..errors import ConfigError

TASKS = ("global_cond", "local_cond", "local_uncond")


@dataclass
class PoolConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    t_star: list[int] = ranged(factory=lambda: [10, 250, 500, 750], ge=0, le=999)
    heads_per_slot: int = ranged(4, ge=1)
    width: int = ranged(64, ge=1)
    depth: int = ranged(1, ge=1)
    dynamic: bool = True  # False: a static discriminator, always head k=0 of every slot (ablation)
    refresh_fraction: float = ranged(0.01, ge=0, le=1)  # share of ALL heads re-initialised per step; 0 disables
    seed: int = ranged(0, ge=0, le=2**31 - 1)
    # Ablation knobs for a single-head baseline (earlier adversarial distillation: one head on the
    # backbone's deepest map, shared by every noise level): which levels get heads (empty = all; -1 =
    # the mid block), and whether heads are grouped by t* (docs/method.md §3) or shared across t*.
    levels: list[int] = ranged(factory=list, ge=-64, le=63)
    group_by_t_star: bool = True

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"pool.tasks: unknown {bad} (choose from {', '.join(TASKS)})")
        if not self.t_star:
            raise ConfigError("pool.t_star: give at least one timestep in [0, 999]")
        if len(set(self.levels)) != len(self.levels):
            raise ConfigError("pool.levels: each level at most once")


@dataclass
class AdversarialConfig:
    shift: int = ranged(250, ge=1, le=1000)  # s: student conditioned on floor(999 s / 1000) (docs/method.md §2.3)
    loss: Literal["hinge", "linear", "nonsat"] = "hinge"
    # sum: one D per sample = all active heads' logits summed over levels and tasks (docs/method.md §3);
    # per_head: the loss is applied to each head's logit and averaged (as in ADD-style discriminators)
    aggregate: Literal["sum", "per_head"] = "sum"
    crop_fraction: float = ranged(0.5, gt=0, lt=1)  # local heads judge crops of this side fraction ([ours]: half-size)
    # R1 on the heads [ours, after LADD / SANA-Sprint]: gamma/2 * E||grad_f D(f)||^2 over the REAL samples'
    # backbone features f (the heads' inputs), added to L_D; 0 = off (the paper has no penalty)
    r1_weight: float = ranged(0.0, ge=0)
    # Regression [ours, after DMD's regression loss]: lambda * mean squared error between the student's one-step
    # x0 and the teacher's x0 from the SAME x_T, added to L_G (the rows regression_rows names). Needs teacher pairs
    # as the real samples. 0 = off: the paper's loss is adversarial only.
    regression_weight: float = ranged(0.0, ge=0)
    # which rows get it: one_step (the pair's x0 is the one-step map's target), or all [ours]: a refinement row is
    # also pulled toward the teacher's sample from its x_T (the answer the refinement should converge to)
    regression_rows: Literal["one_step", "all"] = "one_step"
    # with regression_rows all [ours]: the refinement rows get the term for the first this many training images
    # only, the one-step rows for the whole run (0: every row for the whole run). The pull toward one teacher
    # sample trains refinements early and averages them late (docs/studies/regression-rows.md)
    regression_refine_until: int = ranged(0, ge=0)


@dataclass
class MultiStepConfig:
    p: float = ranged(0.0, ge=0, le=1)  # probability that a sample trains a refinement step instead of the first step
    # the refinement grid, unshifted, in sampling order: the released 4-step grid after its first point
    timesteps: list[int] = ranged(factory=lambda: [749, 499, 249], ge=0, le=999)
    start_images: int = ranged(0, ge=0)  # training images seen before the stage begins (one-step only until then)
    # replace: a refining sample trains its refinement step INSTEAD of its one-step mapping; extra: every sample
    # trains the one-step mapping and the refining ones ALSO a refinement step, from the same pair (equal images
    # seen, about 1 + p times the student compute) [ours]
    mode: Literal["replace", "extra"] = "replace"

    def validate(self) -> None:
        from ..errors import ConfigError

        if self.p > 0 and not self.timesteps:
            raise ConfigError("multistep.timesteps is empty: give the refinement grid, e.g. [749, 499, 249]")
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:], strict=False)):
            raise ConfigError(f"multistep.timesteps must decrease, in sampling order (got {self.timesteps})")
