"""One discriminator head (docs/method.md §3): [4x4 conv stride 2 -> GroupNorm -> SiLU] x depth, then a
1x1 conv to a logit map averaged over space. Light by design: the pool holds hundreds of them."""

from __future__ import annotations

import torch
from torch import nn


def _groups(channels: int, preferred: int = 32) -> int:
    # at least 4 channels per group: deep levels can be 1x1 after the stride-2 conv
    g = max(1, min(preferred, channels // 4))
    while channels % g:
        g -= 1
    return g


class Head(nn.Module):
    def __init__(self, in_channels: int, width: int = 64, depth: int = 1, guidance_dim: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(ch, width, 4, stride=2, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU()]
            ch = width
        layers.append(nn.Conv2d(ch, 1, 1))
        self.net = nn.Sequential(*layers)
        # a guided student's heads (docs/method.md §10): the projection term of a projection discriminator (Miyato
        # & Koyama 2018), <h, embed(w)> averaged over space, so a sample is judged against real ones of its own w
        self.guidance = nn.Linear(guidance_dim, ch, bias=False) if guidance_dim else None

    def reset_parameters(self) -> None:
        """Fresh default initialisation (the pool refresh of docs/method.md §3)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, x: torch.Tensor, w_features: torch.Tensor | None = None) -> torch.Tensor:
        if self.guidance is None:
            return self.net(x).mean(dim=(1, 2, 3))
        h = self.net[:-1](x)
        projection = (h * self.guidance(w_features.to(h.dtype))[:, :, None, None]).sum(1)
        return self.net[-1](h).mean(dim=(1, 2, 3)) + projection.mean(dim=(1, 2))
