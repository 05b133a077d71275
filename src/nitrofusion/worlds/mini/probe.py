"""The overfitting probe of a mini-world run (method/probe.py), as `ablate --probe-every` logs it during training:
the heads' real / fake shares on the training pairs and on held-out teacher samples, and the EMA student's one-step
precision (its complement: the share of samples outside the real manifold, the paper's "artefacts")."""

from __future__ import annotations

import torch

from ...data.pairs import Pairs
from ...method.probe import head_accuracies
from .evaluation import MiniEvaluation


class OverfittingProbe:
    def __init__(self, evaluation: MiniEvaluation, trained_on: Pairs, samples: int = 500, draws: int = 4) -> None:
        self.evaluation, self.draws = evaluation, draws
        self.n = min(samples, len(trained_on), len(evaluation.pairs))
        # the teacher samples both sides are scored on, sliced and encoded once for every probe of the run
        self.trained_on, self.held_out = self._encoded(trained_on), self._encoded(evaluation.pairs)

    def _encoded(self, pairs: Pairs) -> tuple[torch.Tensor, dict]:
        return pairs.x0[:self.n].float(), self.evaluation.adapter.encode_prompts(pairs.prompts[:self.n])

    @torch.no_grad()
    def __call__(self, parts, student: torch.nn.Module) -> dict:
        """`parts`: the loop's TrainParts (its step holds the pool and E); `student`: the weights evaluated."""
        ev = self.evaluation
        fake = ev.student_images(student, 1, self.n)
        shares = head_accuracies(parts.step_fn, self.trained_on, self.held_out, (fake, self.held_out[1]),
                                 self.draws)
        manifold = ev.metrics.manifold(fake, ev.labels[:self.n])
        return {**shares, "precision": manifold["precision"], "outside_manifold": round(1 - manifold["precision"], 4)}
