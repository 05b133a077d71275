"""Fixed-seed evaluation in the mini world: the teacher, the teacher forced to one step, and a student
at 1-4 steps, all from the SAME x_T and prompts (a held-out teacher-pair set)."""

from __future__ import annotations

import dataclasses

import torch

from ...data.pairs import PairInputs, Pairs
from ...method.guidance import with_guidance
from ...sampling.student import generate
from .adapter import MiniAdapter
from .data import class_prompts
from .metrics import MiniMetrics


def labels_for(prompts: list[str]) -> torch.Tensor:
    index = {p: i for i, p in enumerate(class_prompts())}
    return torch.tensor([index.get(p, -1) for p in prompts])


def per_class(labels: torch.Tensor, n: int = 2) -> torch.Tensor:
    """Indices of the first n samples of every class, class by class (the rows of a picture grid)."""
    return torch.cat([(labels == c).nonzero().flatten()[:n] for c in range(len(class_prompts()))])


class MiniEvaluation:
    def __init__(self, adapter: MiniAdapter, eval_pairs: Pairs | PairInputs, metrics: MiniMetrics, shift: int,
                 seed: int = 0, batch_size: int = 500, guidance: float | None = None) -> None:
        """`guidance`: every model here samples at this w (a guided student takes it as conditioning, the teacher
        as its CFG scale); None: each at its own."""
        self.adapter, self.pairs, self.metrics, self.shift = adapter, eval_pairs, metrics, shift
        self.seed, self.batch_size, self.guidance = seed, batch_size, guidance
        self.labels = labels_for(eval_pairs.prompts)

    def score(self, images: torch.Tensor, n: int | None = None, to_teacher: bool = False,
              manifold: bool = True) -> dict:
        n = n or len(images)
        out = {"fid": round(self.metrics.fid(images[:n]), 3),
               "accuracy": round(self.metrics.accuracy(images[:n], self.labels[:n]), 4)}
        if to_teacher:
            out["fid_to_teacher"] = round(self.metrics.fid(images[:n], reference=self.pairs.x0[:n]), 3)
        if manifold:
            out.update(self.metrics.manifold(images[:n], self.labels[:n]))
        return out

    def teacher(self) -> dict:
        spec = self.adapter.sampler
        return {"steps": spec.steps, "sampler": spec.describe(), **self.score(self.pairs.x0)}

    @torch.no_grad()
    def teacher_one_step_images(self) -> torch.Tensor:
        spec = dataclasses.replace(self.adapter.sampler, steps=1)
        return self._batched(lambda x, c, g: self.adapter.teacher_sample(x, c, spec, g))

    @torch.no_grad()
    def student_images(self, unet: torch.nn.Module, steps: int, n: int | None = None,
                       renoise: str = "unshifted") -> torch.Tensor:
        return self._batched(lambda x, c, g: generate(self.adapter, unet, x, c, steps, self.shift, g, renoise), n)

    def _batched(self, fn, n: int | None = None) -> torch.Tensor:
        n = n or len(self.pairs)
        gen = torch.Generator().manual_seed(self.seed)  # re-noising noise: same for every model
        device = next(self.adapter.teacher_unet.parameters()).device
        out = []
        for i in range(0, n, self.batch_size):
            j = min(n, i + self.batch_size)
            cond = {k: v.to(device) for k, v in self.adapter.encode_prompts(self.pairs.prompts[i:j]).items()}
            cond = with_guidance(cond, self.guidance)
            out.append(fn(self.pairs.x_T[i:j].to(device), cond, gen).float().cpu())
        return torch.cat(out)

    def curve(self, n: int):
        """Evaluator for the training loop: 1-step classifier-FID and accuracy on the first n pairs."""

        def evaluate(unet: torch.nn.Module, step: int) -> dict:
            return self.score(self.student_images(unet, 1, n), manifold=False)

        return evaluate
