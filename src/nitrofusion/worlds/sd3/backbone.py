"""E for a DiT (docs/method.md §8): the frozen teacher's patch embedding, time/pooled-text embedding, context
projection and its first N joint transformer blocks. After each tapped block the image tokens [B, h*w, D] are
reshaped to their 2-D grid [B, D, h, w], so the heads (4x4 conv, stride 2) read them as the UNet families'
feature maps. As for the UNet backbone: the teacher's own module (no copy), base-only under a LoRA student, its
parameters frozen, and NOT under no_grad in the G step (the generator's gradient flows through it)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...errors import ConfigError
from ...models.student import base_only, has_lora


class DiTBackbone(nn.Module):
    def __init__(self, transformer: nn.Module, blocks: int, taps: list[int], gradient_checkpointing: bool = False):
        super().__init__()
        total = len(transformer.transformer_blocks)
        if blocks > total:
            raise ConfigError(f"sd3.backbone_blocks {blocks} is more than the teacher's {total} transformer blocks")
        if not taps or max(taps) >= blocks:
            raise ConfigError(f"sd3.taps {taps} out of range: tapped blocks must be 0..{blocks - 1}")
        self.transformer, self.blocks, self.taps = transformer, blocks, list(taps)
        self.gradient_checkpointing = gradient_checkpointing
        if not has_lora(transformer):
            transformer.requires_grad_(False)
        self.channels = [transformer.inner_dim] * len(taps)

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def _block(self, block, hidden, context, temb):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._base_block, block, hidden, context, temb, use_reentrant=False)
        return block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)

    def _base_block(self, block, hidden, context, temb):
        with base_only(self.transformer):
            return block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> list[torch.Tensor]:
        with base_only(self.transformer):
            return self._forward(sample, timestep, encoder_hidden_states, pooled_projections)

    def _forward(self, sample, timestep, encoder_hidden_states, pooled_projections) -> list[torch.Tensor]:
        tr = self.transformer
        p = tr.config.patch_size
        h, w = sample.shape[-2] // p, sample.shape[-1] // p
        # mirrors SD3Transformer2DModel.forward up to block N
        hidden = tr.pos_embed(sample).contiguous()
        temb = tr.time_text_embed(timestep, pooled_projections)
        context = tr.context_embedder(encoder_hidden_states)
        feats = []
        for i, block in enumerate(tr.transformer_blocks[:self.blocks]):
            context, hidden = self._block(block, hidden, context, temb)
            if i in self.taps:
                feats.append(hidden.transpose(1, 2).reshape(hidden.shape[0], -1, h, w))
        return feats
