"""The dynamic head pool (docs/method.md §3).

Heads are indexed by (task, t*, level, k). Each optimiser step activates ONE head per (task, t*, level)
slot, chosen at random (dynamic sampling), and afterwards re-initialises a uniformly chosen ~1% of ALL
heads, resetting their optimiser state (pool refresh). All randomness comes from the pool's own
generator, seeded identically on every process, so every rank samples and refreshes the same heads;
its state is saved in every checkpoint (generator_state).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .config import TASKS, PoolConfig  # noqa: F401 - re-exported: the pool's config lives with the others
from .guidance import head_features
from .heads import Head

GUIDANCE_FEATURES = 16  # sines and cosines of w that a guided pool's heads project (method/guidance.py)


class HeadPool(nn.Module):
    def __init__(self, cfg: PoolConfig, level_channels: list[int], guided: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.tasks = list(cfg.tasks)
        self.t_star = list(cfg.t_star)
        n = len(level_channels)
        if any(not -n <= lvl < n for lvl in cfg.levels):
            raise ConfigError(f"pool.levels {cfg.levels}: this backbone has {n} feature levels (0..{n - 1}, -1 = mid)")
        self.levels = sorted({lvl % n for lvl in cfg.levels}) if cfg.levels else list(range(n))
        self.num_levels = len(self.levels)
        self.groups = len(self.t_star) if cfg.group_by_t_star else 1
        self.per_slot = cfg.heads_per_slot if cfg.dynamic else 1
        # guided: every head also sees each row's guidance scale w (heads.py, docs/method.md §10)
        self.guidance_dim = GUIDANCE_FEATURES if guided else 0
        self.heads = nn.ModuleList(
            Head(level_channels[lvl], cfg.width, cfg.depth, self.guidance_dim)
            for _task in self.tasks for _t in range(self.groups) for lvl in self.levels
            for _k in range(self.per_slot)
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def generator_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return len(self.tasks), self.groups, self.num_levels, self.per_slot

    def index(self, task: int, t: int, level: int, k: int) -> int:
        _, nt, nl, nk = self.shape
        return ((task * nt + t) * nl + level) * nk + k

    def head(self, task: int, t: int, level: int, k: int) -> Head:
        return self.heads[self.index(task, t, level, k)]

    def sample_active(self) -> torch.Tensor:
        """k for every (task, t*, level) slot: [tasks, t*, levels]; all zeros for a static pool."""
        ntask, nt, nl, nk = self.shape
        if not self.cfg.dynamic:
            return torch.zeros(ntask, nt, nl, dtype=torch.long)
        return torch.randint(0, nk, (ntask, nt, nl), generator=self.generator)

    def active_indices(self, active: torch.Tensor) -> list[int]:
        nt, nl = active.shape[1:]
        return [self.index(a, b, c, int(active[a, b, c])) for a in range(len(self.tasks))
                for b in range(nt) for c in range(nl)]

    def refresh(self, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """Re-initialise a uniform ~refresh_fraction of all heads and drop their optimiser state."""
        total = len(self.heads)
        n = round(self.cfg.refresh_fraction * total)
        if self.cfg.refresh_fraction > 0:
            n = max(1, n)
        if n == 0:
            return []
        chosen = torch.randperm(total, generator=self.generator)[:n].tolist()
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimisers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # same fresh weights on every rank
            for i in sorted(chosen):
                self.heads[i].reset_parameters()
                if opt is not None:
                    for p in self.heads[i].parameters():
                        opt.state.pop(p, None)
        return sorted(chosen)

    def logits(self, task: int, active: torch.Tensor, feats: list[torch.Tensor],
               t_idx: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Per-level logits [B, levels] of the active heads for `task`; sample i is judged by the heads
        of its own t* (t_idx[i]), or by the shared ones when heads are not grouped by t*; `w`: the rows'
        guidance scales (a guided pool's heads take them)."""
        return self.logits_many(task, active, [feats], t_idx, w)[0]

    def logits_many(self, task: int, active: torch.Tensor, feat_sets: list[list[torch.Tensor]],
                    t_idx: torch.Tensor, w: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`logits` of several feature sets at the same t* (the D step's real and fake views, whose rows share
        their w), each head called once on all their rows: a head's output for a row depends on that row alone
        (its conv and per-sample GroupNorm), so this equals one call per set, in a fraction of the calls."""
        if self.guidance_dim and w is None:
            raise ValueError("a guided head pool judges each row at its guidance scale: pass w")
        b = feat_sets[0][0].shape[0]
        outs = [f[0].new_zeros(b, self.num_levels) for f in feat_sets]
        group = t_idx if self.groups > 1 else torch.zeros_like(t_idx)
        w_feats = head_features(w, self.guidance_dim) if self.guidance_dim else None
        for t in range(self.groups):
            rows = (group == t).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            w_rows = w_feats.index_select(0, rows).repeat(len(feat_sets), 1) if w_feats is not None else None
            cols = []
            for j, lvl in enumerate(self.levels):
                x = torch.cat([f[lvl].index_select(0, rows) for f in feat_sets])
                cols.append(self.head(task, t, j, int(active[task, t, j]))(x, w_rows))
            per_set = torch.stack(cols, dim=1).split(rows.numel())
            outs = [o.index_copy(0, rows, v.to(o.dtype)) for o, v in zip(outs, per_set, strict=True)]
        return outs
