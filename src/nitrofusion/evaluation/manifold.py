"""k-NN manifold metrics in a feature space: what FID folds into one number, split into fidelity and
diversity.

- precision (Kynkaanniemi et al. 2019): share of generated samples inside the real manifold, i.e. within
  the k-NN radius of some real sample (radius = distance to that sample's k-th nearest real neighbour).
- recall: share of real samples inside the generated manifold (radii from the generated set).
- coverage (Naeem et al. 2020): share of real samples whose own k-NN ball holds at least one generated
  sample; unlike recall it is not inflated by a few outlying generated samples.
A mode-dropping generator keeps precision and loses recall / coverage; an artefact-prone one the reverse.
"""

from __future__ import annotations

import torch


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest OTHER row."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {len(x)}")
    d = torch.cdist(x.double(), x.double())
    return d.kthvalue(k + 1, dim=1).values  # the k+1-th smallest: the row itself is at distance 0


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """[len(points)] bool: inside at least one ball (centre, radius)."""
    d = torch.cdist(points.double(), centres.double())
    return (d <= radii.unsqueeze(0)).any(dim=1)


def _hit(centres: torch.Tensor, radii: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """[len(centres)] bool: the ball around each centre holds at least one point."""
    d = torch.cdist(centres.double(), points.double())
    return (d <= radii.unsqueeze(1)).any(dim=1)


def precision_recall_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    real_r, fake_r = knn_radii(real, k), knn_radii(fake, k)
    return {"precision": _inside(fake, real, real_r).double().mean().item(),
            "recall": _inside(real, fake, fake_r).double().mean().item(),
            "coverage": _hit(real, real_r, fake).double().mean().item()}


def per_class_coverage(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor,
                       fake_labels: torch.Tensor, classes: int, k: int = 3) -> list[float | None]:
    """Coverage of each class's real samples by the samples generated FOR that class (None if too few)."""
    out: list[float | None] = []
    for c in range(classes):
        r, f = real[real_labels == c], fake[fake_labels == c]
        if len(r) <= k or len(f) == 0:
            out.append(None)
            continue
        out.append(_hit(r, knn_radii(r, k), f).double().mean().item())
    return out
