"""Adversarial losses on discriminator outputs D (SPEC section 4). Adversarial only: no regression term.

hinge:  L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))],   L_G = -E[D(fake)]
linear: L_D = E[-D(real)] + E[D(fake)]  (WGAN, no penalty),    L_G = -E[D(fake)]
nonsat: L_D = E[softplus(-D(real))] + E[softplus(D(fake))],  L_G = E[softplus(-D(fake))]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("hinge", "linear", "nonsat")


def d_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "linear":
        return fake.mean() - real.mean()
    if kind == "nonsat":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    raise ValueError(f"unknown loss '{kind}' (use one of {LOSSES})")


def g_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind in ("hinge", "linear"):
        return -fake.mean()
    if kind == "nonsat":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown loss '{kind}' (use one of {LOSSES})")
