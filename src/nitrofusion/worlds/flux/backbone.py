"""E for FLUX (docs/method.md §8): the frozen teacher's token embedding (`x_embedder` on 2x2-packed latents), its
time + guidance + pooled-text embedding, context projection and rotary position embedding (`pos_embed` on the text
and image ids), and its first N double-stream blocks (`transformer_blocks`; the single-stream blocks after them are
not E's). After each tapped block the image tokens [B, h*w, D] are reshaped to their 2-D grid [B, D, h, w] (h, w =
latent / 2), so the heads read them as the UNet families' feature maps. As sd3/backbone.py: the teacher's own module
(no copy), base-only under a LoRA student, its parameters frozen, and NOT under no_grad in the G step."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...errors import ConfigError
from ...models.student import base_only, has_lora


class FluxBackbone(nn.Module):
    def __init__(self, transformer: nn.Module, blocks: int, taps: list[int], gradient_checkpointing: bool = False):
        super().__init__()
        total = len(transformer.transformer_blocks)
        if blocks > total:
            raise ConfigError(f"flux.backbone_blocks {blocks} is more than the teacher's {total} double-stream "
                              "blocks")
        if not taps or max(taps) >= blocks:
            raise ConfigError(f"flux.taps {taps} out of range: tapped blocks must be 0..{blocks - 1}")
        self.transformer, self.blocks, self.taps = transformer, blocks, list(taps)
        self.gradient_checkpointing = gradient_checkpointing
        if not has_lora(transformer):
            transformer.requires_grad_(False)
        self.channels = [transformer.inner_dim] * len(taps)

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def _block(self, block, hidden, context, temb, rotary):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._base_block, block, hidden, context, temb, rotary, use_reentrant=False)
        return block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)

    def _base_block(self, block, hidden, context, temb, rotary):
        with base_only(self.transformer):
            return block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)

    def forward(self, tokens: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor | None,
                pooled_projections: torch.Tensor, encoder_hidden_states: torch.Tensor, txt_ids: torch.Tensor,
                img_ids: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """`tokens`: packed latents [B, h*w, 4C]; `timestep` and `guidance` as FluxTransformer2DModel takes them
        (sigma = t / 1000, and the guidance scale; it multiplies both by 1000); `grid`: (h, w) of the token grid."""
        with base_only(self.transformer):
            return self._forward(tokens, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids,
                                 img_ids, grid)

    def _forward(self, tokens, timestep, guidance, pooled, context, txt_ids, img_ids, grid) -> list[torch.Tensor]:
        tr = self.transformer
        # mirrors FluxTransformer2DModel.forward up to double-stream block N
        hidden = tr.x_embedder(tokens)
        timestep = timestep.to(hidden.dtype) * 1000
        if guidance is None:
            temb = tr.time_text_embed(timestep, pooled)
        else:
            temb = tr.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)
        context = tr.context_embedder(context)
        rotary = tr.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        feats = []
        for i, block in enumerate(tr.transformer_blocks[:self.blocks]):
            context, hidden = self._block(block, hidden, context, temb, rotary)
            if i in self.taps:
                feats.append(hidden.transpose(1, 2).reshape(hidden.shape[0], -1, *grid))
        return feats
