"""One adversarial micro-step (docs/method.md §2), model-agnostic.

Data flows one way: teacher pair (x_T, x0_real, prompt) -> student one-step x0_fake from the SAME x_T ->
re-noise both to a per-sample t* (independent noise) -> frozen backbone E (whole sample, or a crop;
with the prompt, or the null prompt) -> the active heads of that t* -> losses.
G step: heads frozen, gradient flows through E into the student. D step: inputs detached, only the
active heads get gradients. Both losses are backpropagated here; the trainer steps the optimisers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..stopwatch import section
from . import guidance
from .adapter import Cond, ModelAdapter, cond_cat, cond_index
from .backbone import UNetBackbone
from .config import AdversarialConfig, MultiStepConfig
from .losses import d_loss, g_loss, r1_penalty, regression_loss
from .pool import HeadPool
from .refine import backward_simulate, draw_refinement, student_x0


def student_one_step(adapter: ModelAdapter, student: torch.nn.Module, x_T: torch.Tensor, cond: Cond,
                     shift: int) -> torch.Tensor:
    """docs/method.md §2.3: condition on t_s, input pure noise x_T, convert the output to x0 with alpha_bar[t_s]."""
    t = torch.full((x_T.shape[0],), adapter.num_train_timesteps - 1, device=x_T.device, dtype=torch.long)
    return student_x0(adapter, student, x_T, t, cond, shift)


def random_boxes(n: int, size: tuple[int, int], crop: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """[n, 2] top-left corners of crops of shape `crop` inside `size`."""
    ys = torch.randint(0, size[0] - crop[0] + 1, (n,), generator=gen)
    xs = torch.randint(0, size[1] - crop[1] + 1, (n,), generator=gen)
    return torch.stack([ys, xs], dim=1)


def crop(x: torch.Tensor, boxes: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    return torch.stack([x[i, :, y:y + ch, z:z + cw] for i, (y, z) in enumerate(boxes.tolist())])


class AdversarialStep:
    def __init__(self, adapter: ModelAdapter, student: torch.nn.Module, backbone: UNetBackbone,
                 pool: HeadPool, cfg: AdversarialConfig, multistep: MultiStepConfig | None = None) -> None:
        self.adapter, self.student, self.backbone, self.pool, self.cfg = adapter, student, backbone, pool, cfg
        self.multistep = multistep or MultiStepConfig()
        self.nonfinite: list[tuple[str, int]] = []
        # where the student's forward is a collective (FSDP: training/fsdp.py), every rank must call it as often:
        # this maps this rank's backward-simulation depth to the deepest of all ranks' (None: its own)
        self.agree_depth: Callable[[int], int] | None = None

    def fake_x0(self, x_T: torch.Tensor, cond: Cond, refine_p: float, gen: torch.Generator):
        """The student's x0 that the heads judge, and the input timestep of each sample's trained step:
        the one-step sample, or (with probability refine_p) a refinement step made by backward simulation."""
        n = self.adapter.num_train_timesteps
        if refine_p <= 0:  # the one-step method, drawing nothing from `gen`
            return student_one_step(self.adapter, self.student, x_T, cond, self.cfg.shift), None
        grid = self.multistep.timesteps
        k = draw_refinement(x_T.shape[0], refine_p, len(grid), gen).to(x_T.device)
        depth = self.agree_depth(int(k.max())) if self.agree_depth is not None else None
        x_in, t_in = backward_simulate(self.adapter, self.student, x_T, cond, k, grid, self.cfg.shift, gen, depth)
        x0 = student_x0(self.adapter, self.student, x_in, t_in, cond, self.cfg.shift)
        return x0, torch.where(k > 0, t_in, torch.full_like(t_in, n - 1))

    def crop_size(self, h: int, w: int) -> tuple[int, int]:
        m = self.adapter.crop_multiple
        return (max(m, int(h * self.cfg.crop_fraction) // m * m), max(m, int(w * self.cfg.crop_fraction) // m * m))

    def views(self, task: str, real: torch.Tensor, fake: torch.Tensor, cond: Cond, gen: torch.Generator):
        """What E sees for one task: (real view, fake view, conditioning, crop boxes or None)."""
        if task == "global_cond":
            return real, fake, cond, None
        h, w = real.shape[-2:]
        ch, cw = self.crop_size(h, w)
        boxes = random_boxes(real.shape[0], (h, w), (ch, cw), gen)
        c = cond if task == "local_cond" else self.adapter.null_cond(cond)
        return crop(real, boxes, ch, cw), crop(fake, boxes, ch, cw), c, boxes

    def noised(self, x0: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
        return self.adapter.process.add_noise(x0, noise, t)

    def task_groups(self) -> list[list[int]]:
        """Tasks whose views share a shape, so E sees them in one call: the whole-image task alone, the
        crop tasks together (same t*, same crop size; only their prompts differ)."""
        local = [i for i, task in enumerate(self.pool.tasks) if task != "global_cond"]
        return [[i] for i, task in enumerate(self.pool.tasks) if task == "global_cond"] + ([local] if local else [])

    def _features(self, x_ts: list[torch.Tensor], t: torch.Tensor, conds: list[Cond],
                  boxes: list) -> list[list[torch.Tensor]]:
        """E's feature levels of each task's noised view, from ONE backbone call over all of them: a row's
        features depend on that row alone, so this equals one call per task, with fewer and larger kernels."""
        if len(x_ts) == 1:
            return [self.adapter.backbone_call(self.backbone, x_ts[0], t, conds[0], boxes[0])]
        feats = self.adapter.backbone_call(self.backbone, torch.cat(x_ts), t.repeat(len(x_ts)), cond_cat(*conds),
                                           None if boxes[0] is None else torch.cat(boxes))
        per_level = [f.split(x_ts[0].shape[0]) for f in feats]
        return [[level[k] for level in per_level] for k in range(len(x_ts))]

    def r1(self, feats_real: list[list[torch.Tensor]], active: torch.Tensor, t_idx: torch.Tensor,
           w: torch.Tensor | None = None) -> torch.Tensor:
        """1/2 E_i ||grad D(real_i)||^2 w.r.t. every task's real features: D sums the tasks, whose inputs are
        disjoint, so the squared norm is the sum of the per-task ones (losses.r1_penalty)."""
        per_sample = sum(r1_penalty(lambda f, i=i: self.pool.logits(i, active, f, t_idx, w).sum(1), feats)
                         for i, feats in enumerate(feats_real))
        return 0.5 * per_sample.mean()

    def _reduce(self, real: list[torch.Tensor] | None, fake: list[torch.Tensor], which: str) -> torch.Tensor:
        """Total loss from per-task [B, levels] logits."""
        if self.cfg.aggregate == "sum":
            d_fake = torch.stack([f.sum(1) for f in fake]).sum(0)
            if which == "g":
                return g_loss(d_fake, self.cfg.loss)
            d_real = torch.stack([r.sum(1) for r in real]).sum(0)
            return d_loss(d_real, d_fake, self.cfg.loss)
        if which == "g":
            return torch.stack([g_loss(f[:, j], self.cfg.loss) for f in fake for j in range(f.shape[1])]).mean()
        return torch.stack([d_loss(r[:, j], f[:, j], self.cfg.loss)
                            for r, f in zip(real, fake, strict=True) for j in range(f.shape[1])]).mean()

    def _regression(self, x0_fake: torch.Tensor, x0_real: torch.Tensor, t_in: torch.Tensor | None,
                    refine_regression: bool):
        """The regression term [ours] on the one-step rows (regression_rows "all" while `refine_regression`:
        on every row), or None when it is off or no row gets it."""
        if self.cfg.regression_weight <= 0:
            return None
        if t_in is not None and not (self.cfg.regression_rows == "all" and refine_regression):
            one = t_in == self.adapter.num_train_timesteps - 1
            if not bool(one.any()):
                return None
            x0_fake, x0_real = x0_fake[one], x0_real[one]
        return regression_loss(x0_fake, x0_real)

    def _separable(self) -> bool:
        """True when L_G is a sum of per-task terms, so each task's backbone graph can be freed after its
        own backward: hinge/linear L_G = -mean(D) is linear in D, and per-head losses are per-head sums."""
        return self.cfg.aggregate == "per_head" or self.cfg.loss in ("hinge", "linear")

    def _g_term(self, fake: torch.Tensor) -> torch.Tensor:
        """One task's share of L_G, given its [B, levels] logits (sum of shares = _reduce(..., 'g'))."""
        if self.cfg.aggregate == "sum":
            return g_loss(fake.sum(1), self.cfg.loss)
        n = len(self.pool.tasks) * fake.shape[1]
        return torch.stack([g_loss(fake[:, j], self.cfg.loss) for j in range(fake.shape[1])]).sum() / n

    def __call__(self, x_T: torch.Tensor, x0_real: torch.Tensor, cond: Cond, active: torch.Tensor,
                 gen: torch.Generator, loss_scale: float = 1.0, train_g: bool = True,
                 train_d: bool = True, refine_p: float = 0.0, refine_regression: bool = True) -> dict[str, float]:
        """Forward both players on one micro-batch and backpropagate `loss_scale` x each loss.
        `refine_p`: probability that a sample trains a refinement step (method/refine.py); `refine_regression`:
        whether regression_rows "all" gives those rows the regression term now (regression_refine_until).
        Sets `self.nonfinite` to the (task, t*) pairs whose logits were not finite."""
        if refine_p > 0 and self.multistep.mode == "extra":  # the refining pairs again, as extra rows
            rows = (torch.rand(x_T.shape[0], generator=gen) < refine_p).nonzero(as_tuple=True)[0].to(x_T.device)
            x0_fake = student_one_step(self.adapter, self.student, x_T, cond, self.cfg.shift)
            t_in = torch.full((x_T.shape[0],), self.adapter.num_train_timesteps - 1, device=x_T.device)
            if rows.numel():
                x0_ref, t_ref = self.fake_x0(x_T[rows], cond_index(cond, rows), 1.0, gen)
                x0_fake, t_in = torch.cat([x0_fake, x0_ref]), torch.cat([t_in, t_ref])
                x_T, x0_real = torch.cat([x_T, x_T[rows]]), torch.cat([x0_real, x0_real[rows]])
                cond = cond_cat(cond, cond_index(cond, rows))
        else:
            with section("student forward"):
                x0_fake, t_in = self.fake_x0(x_T, cond, refine_p, gen)
        x0_real = x0_real.float()
        w, cond = cond.get(guidance.KEY), guidance.prompt_only(cond)  # the heads take w; E sees the prompt
        n_t = len(self.pool.t_star)
        # t* per sample, stratified: every t* group gets floor or ceil of B / len(t*) samples
        t_idx = torch.randperm(x_T.shape[0], generator=gen) % n_t
        t = torch.tensor(self.pool.t_star, dtype=torch.long)[t_idx].to(x_T.device)
        t_idx = t_idx.to(x_T.device)
        # Memory: with a separable L_G each task backpropagates into a detached copy of x0_fake at once,
        # freeing its backbone graph; the student's graph is then walked once with the summed gradient.
        per_task = train_g and self._separable()
        fake_in = x0_fake.detach().requires_grad_() if per_task else (x0_fake if train_g else x0_fake.detach())
        reg = self._regression(fake_in, x0_real, t_in, refine_regression) if train_g else None
        if reg is not None and per_task:  # into fake_in.grad, walked through the student with the tasks' share
            with section("regression backward"):
                (reg * self.cfg.regression_weight * loss_scale).backward()
        feats_real: dict[int, list[torch.Tensor]] = {}
        feats_fake: dict[int, list[torch.Tensor]] = {}
        g_terms = []
        for group in self.task_groups():
            name = " + ".join(self.pool.tasks[i] for i in group)
            real_x, fake_x, conds, boxes = [], [], [], []
            for i in group:  # random draws in task order: boxes, then the real view's noise, then the fake's
                real_v, fake_v, c, b = self.views(self.pool.tasks[i], x0_real, fake_in, cond, gen)
                real_x.append(self.noised(real_v, t, gen))
                fake_x.append(self.noised(fake_v, t, gen))
                conds.append(c)
                boxes.append(b)
            with torch.no_grad(), section(f"E forward, real ({name})"):
                real = self._features(real_x, t, conds, boxes)
            with section(f"E forward, fake ({name})"):
                fake = self._features(fake_x, t, conds, boxes)
            if per_task:  # G step for these tasks: heads frozen, gradient through E into fake_in
                self.pool.requires_grad_(False)
                with section("heads forward (G)"):
                    terms = [self._g_term(self.pool.logits(i, active, f, t_idx, w))
                             for i, f in zip(group, fake, strict=True)]
                with section(f"backward through E ({name})"):
                    (torch.stack(terms).sum() * loss_scale).backward()
                self.pool.requires_grad_(True)
                g_terms += [term.detach() for term in terms]
                fake = [[x.detach() for x in f] for f in fake]
            feats_real.update(zip(group, real, strict=True))
            feats_fake.update(zip(group, fake, strict=True))
        feats_real = [feats_real[i] for i in range(len(self.pool.tasks))]
        feats_fake = [feats_fake[i] for i in range(len(self.pool.tasks))]

        logs: dict[str, float] = {}
        if per_task:
            if fake_in.grad is not None:
                with section("student backward"):
                    x0_fake.backward(fake_in.grad)
            logs["loss_g"] = torch.stack(g_terms).sum().item()
        elif train_g:  # G step over all tasks at once (non-separable loss)
            self.pool.requires_grad_(False)
            fake_logits = [self.pool.logits(i, active, f, t_idx, w) for i, f in enumerate(feats_fake)]
            loss_g = self._reduce(None, fake_logits, "g")
            total = loss_g if reg is None else loss_g + self.cfg.regression_weight * reg
            (total * loss_scale).backward()
            self.pool.requires_grad_(True)
            logs["loss_g"] = loss_g.item()
        # D step: everything detached; only the active heads enter the graph
        with section("heads forward (D)"):
            both = [self.pool.logits_many(i, active, [r, [x.detach() for x in f]], t_idx, w)
                    for i, (r, f) in enumerate(zip(feats_real, feats_fake, strict=True))]
            real_logits, fake_logits = [r for r, _ in both], [f for _, f in both]
            loss_d = self._reduce(real_logits, fake_logits, "d")
        if self.cfg.r1_weight > 0 and train_d:
            with section("R1"):
                r1 = self.r1(feats_real, active, t_idx, w)
            loss_d = loss_d + self.cfg.r1_weight * r1
            logs["r1"] = r1.item()
        if train_d:
            with section("heads backward (D)"):
                (loss_d * loss_scale).backward()
        logs["loss_d"] = loss_d.item()
        if reg is not None:
            logs["regression"] = reg.item()
        if t_in is not None:
            logs["refine_share"] = (t_in < self.adapter.num_train_timesteps - 1).float().mean().item()
        self.nonfinite = []
        for task, r, f in zip(self.pool.tasks, real_logits, fake_logits, strict=True):
            dr, df = r.detach().sum(1), f.detach().sum(1)
            logs[f"{task}/d_real"] = dr.mean().item()
            logs[f"{task}/d_fake"] = df.mean().item()
            logs[f"{task}/loss_d"] = d_loss(dr, df, self.cfg.loss).item()
            logs[f"{task}/loss_g"] = g_loss(df, self.cfg.loss).item()
            bad = ~(torch.isfinite(dr) & torch.isfinite(df))
            self.nonfinite += [(task, ts) for ts in sorted(set(t[bad].tolist()))]
        return logs
