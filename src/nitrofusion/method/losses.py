"""Losses (docs/method.md §4): adversarial ones on discriminator outputs D, as in the paper, and an optional
regression term [ours] that the paper does not use.

hinge:  L_D = E[relu(1 - D(real))] + E[relu(1 + D(fake))],   L_G = -E[D(fake)]
linear: L_D = E[-D(real)] + E[D(fake)]  (WGAN, no penalty),    L_G = -E[D(fake)]
nonsat: L_D = E[softplus(-D(real))] + E[softplus(D(fake))],  L_G = E[softplus(-D(fake))]
R1 (optional, added to L_D): gamma/2 * E_real ||grad D||^2, the gradient taken w.r.t. the heads' inputs.
regression (optional, added to L_G): E ||G(x_T) - T(x_T)||^2 / dim, the student's and teacher's x0 from one x_T.
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


def regression_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's x0 and the teacher's x0 from the same x_T (in fp32)."""
    return F.mse_loss(fake.float(), real.float())


def r1_penalty(discriminator, feats: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample ||grad_f D(f)||^2 at the given (real) inputs, summed over the list; differentiable, so the
    heads can be trained to keep it small (R1, Mescheder et al. 2018, here on the heads' inputs)."""
    feats = [f.detach().requires_grad_(True) for f in feats]
    d = discriminator(feats)  # [B]
    grads = torch.autograd.grad(d.sum(), feats, create_graph=True)
    return torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)
