"""Model builders for the mini world: the pixel-space teacher UNet and the metric classifier."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from .config import MiniUNetConfig  # noqa: F401 - re-exported
from .text import EMBED_DIM


def build_unet(cfg: MiniUNetConfig) -> UNet2DConditionModel:
    """SDXL's block layout (plain, cross-attn, cross-attn; 2 layers each) at pixel scale: 10 backbone levels."""
    return UNet2DConditionModel(
        sample_size=cfg.resolution, in_channels=1, out_channels=1,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=EMBED_DIM, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_noise_scheduler() -> DDPMScheduler:
    """SD/SDXL's training schedule (scaled_linear 0.00085-0.012, 1000 steps, eps-prediction), so the
    shifted LCM scheduler and every timestep in docs/method.md mean the same thing in both worlds."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)


class FashionClassifier(nn.Module):
    """Small CNN; its penultimate activations are the feature space of classifier-FID."""

    num_features = 128

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(block(1, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2),
                                  block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(128, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ClassifierFeatures(nn.Module):
    """Adapter for torchmetrics' FID: images in [-1, 1] -> penultimate features (float64 downstream)."""

    def __init__(self, classifier: FashionClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float())
