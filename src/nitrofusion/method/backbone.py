"""The frozen discriminator backbone E (docs/method.md §3): the teacher UNet's conv_in, down blocks and mid
block, returning every residual output of the down path plus the mid-block output.

For SDXL's block layout that is 10 maps: conv_in; 2 resnets + downsampler of block 0; the same of block 1;
2 resnets of block 2; mid. E reuses the teacher's module (no copy; a LoRA student's adapters on that module
are off while E runs). Its parameters never train, but it is NOT run under no_grad in the G step: the
generator's gradient flows through it (docs/method.md §4).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models.student import base_only, has_lora


def level_channels(unet: UNet2DConditionModel) -> list[int]:
    """Channels of every feature level, in the order forward() returns them."""
    cfg = unet.config
    layers = cfg.layers_per_block
    layers = [layers] * len(cfg.block_out_channels) if isinstance(layers, int) else list(layers)
    chans = [cfg.block_out_channels[0]]
    for i, (block, ch) in enumerate(zip(unet.down_blocks, cfg.block_out_channels, strict=True)):
        chans += [ch] * layers[i]
        if getattr(block, "downsamplers", None):
            chans.append(ch)
    chans.append(cfg.block_out_channels[-1])
    return chans


class UNetBackbone(nn.Module):
    def __init__(self, unet: UNet2DConditionModel, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.gradient_checkpointing = gradient_checkpointing
        if not has_lora(unet):  # a LoRA student's base is frozen already, and its adapters must stay trainable
            unet.requires_grad_(False)
        self.channels = level_channels(unet)

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def _block(self, block, *args, **kwargs):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # the recomputation runs inside the backward, outside forward()'s base_only: enter it again there
            return checkpoint(self._base_block, block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def _base_block(self, block, *args, **kwargs):
        with base_only(self.unet):
            return block(*args, **kwargs)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict | None = None) -> list[torch.Tensor]:
        """E is the frozen base: a LoRA student's adapters, which live on this very module, are off."""
        with base_only(self.unet):
            return self._forward(sample, timestep, encoder_hidden_states, added_cond_kwargs)

    def _forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs) -> list[torch.Tensor]:
        u = self.unet
        # Mirrors UNet2DConditionModel.forward up to the mid block (time, added conditions, down, mid).
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                              added_cond_kwargs=added_cond_kwargs or {})
        if aug is not None:
            emb = emb + aug
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        ehs = u.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                              added_cond_kwargs=added_cond_kwargs or {})
        h = u.conv_in(sample)
        feats = [h]
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = self._block(block, hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, res = self._block(block, hidden_states=h, temb=emb)
            feats.extend(res)
        if getattr(u.mid_block, "has_cross_attention", False):
            h = self._block(u.mid_block, h, emb, encoder_hidden_states=ehs)
        else:
            h = self._block(u.mid_block, h, emb)
        feats.append(h)
        return feats
