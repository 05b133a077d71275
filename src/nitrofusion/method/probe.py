"""The discriminator's overfitting, measured (docs/studies/fewstep.md).

The paper argues (§3.2) that one fixed discriminator overfits: it memorises the real samples it trains on and
stops giving the generator useful feedback, while a pool of heads sampled anew and partly re-initialised each
step does not. Here the heads are scored as a classifier, D > 0 meaning "real" (the hinge loss's margin,
docs/method.md §2): the share of the teacher samples they trained on that they call real, the same share on
held-out teacher samples they never saw, and the share of student samples they call fake. The first share less
the second is the memorisation.

Read-only: no gradients, and a generator of its own (never the trainer's or the pool's), so probing a run changes
none of its numbers.
"""

from __future__ import annotations

import torch

from . import guidance
from .adapter import Cond
from .step import AdversarialStep


@torch.no_grad()
def judge(step: AdversarialStep, x0: torch.Tensor, cond: Cond, active: torch.Tensor,
          gen: torch.Generator) -> torch.Tensor:
    """D(x0) per sample, as L_D sees it with aggregate "sum": every task's active heads, summed over levels and
    tasks; t* stratified over the pool's groups, crops and noise drawn from `gen` (method/step.py)."""
    pool = step.pool
    t_idx = torch.randperm(x0.shape[0], generator=gen) % len(pool.t_star)
    t = torch.tensor(pool.t_star, dtype=torch.long)[t_idx].to(x0.device)
    t_idx = t_idx.to(x0.device)
    total = x0.new_zeros(x0.shape[0])
    w, cond = cond.get(guidance.KEY), guidance.prompt_only(cond)
    for i, task in enumerate(pool.tasks):
        view, _, c, boxes = step.views(task, x0, x0, cond, gen)
        feats = step.adapter.backbone_call(step.backbone, step.noised(view, t, gen), t, c, boxes)
        total += pool.logits(i, active, feats, t_idx, w).sum(1).float()
    return total


def active_draws(step: AdversarialStep, draws: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The head choices to average over: `draws` random ones for a dynamic pool (as its training steps draw them),
    the one fixed choice of a static pool."""
    ntask, nt, nl, nk = step.pool.shape
    if not step.pool.cfg.dynamic:
        return [torch.zeros(ntask, nt, nl, dtype=torch.long)]
    return [torch.randint(0, nk, (ntask, nt, nl), generator=gen) for _ in range(draws)]


@torch.no_grad()
def head_accuracies(step: AdversarialStep, trained_on: tuple[torch.Tensor, Cond],
                    held_out: tuple[torch.Tensor, Cond], fake: tuple[torch.Tensor, Cond], draws: int = 4,
                    seed: int = 0) -> dict[str, float]:
    """The pool as a classifier: shares of `trained_on` and `held_out` teacher samples called real, of `fake`
    student samples called fake, averaged over head draws; each set sees the same draws, t*, crops and noise."""
    gen = torch.Generator().manual_seed(seed)
    shares = {"real_trained_on": 0.0, "real_held_out": 0.0, "fake": 0.0}
    choices = active_draws(step, draws, gen)
    for k, active in enumerate(choices):
        for name, (x0, cond) in (("real_trained_on", trained_on), ("real_held_out", held_out), ("fake", fake)):
            d = judge(step, x0, cond, active, torch.Generator().manual_seed(seed * 1000 + k))
            shares[name] += float(((d < 0) if name == "fake" else (d > 0)).float().mean()) / len(choices)
    shares["overfit_gap"] = shares["real_trained_on"] - shares["real_held_out"]
    return {k: round(v, 4) for k, v in shares.items()}
