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
    def __init__(self, in_channels: int, width: int = 64, depth: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(ch, width, 4, stride=2, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU()]
            ch = width
        layers.append(nn.Conv2d(ch, 1, 1))
        self.net = nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        """Fresh default initialisation (the pool refresh of docs/method.md §3)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3))
