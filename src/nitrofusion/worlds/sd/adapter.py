"""Stable Diffusion 1.x / 2.x adapter: one CLIP text encoder (ViT-L for 1.x, OpenCLIP ViT-H for 2.x), its last
hidden state as the UNet's cross-attention input, no pooled embedding and no micro-conditioning. Epsilon- and
v-prediction teachers both work: the method reads x0 with the scheduler's prediction type (method/diffusion.py).

The null prompt is the encoding of the empty prompt, which is what these models were trained to see when the
caption is dropped and what StableDiffusionPipeline's classifier-free guidance uses (SDXL's zero embeddings,
docs/method.md §3, are that family's own choice: `force_zeros_for_empty_prompt`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...method.adapter import Cond
from ...quiet import transformers_progress_off
from ..pipelines.family import SD, Family
from ..pipelines.parts import load_component
from ..pipelines.unet_adapter import UNetPipelineAdapter
from .config import SDConfig


class SDAdapter(UNetPipelineAdapter):
    family: Family = SD

    def family_config(self) -> SDConfig:
        return SDConfig()

    def _load_text(self, folder: Path) -> tuple[list, list]:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = load_component(CLIPTokenizer, folder / "tokenizer")
        with transformers_progress_off():
            encoder = load_component(CLIPTextModel, folder / "text_encoder")
        return [tokenizer], [encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """As StableDiffusionPipeline.encode_prompt with clip_skip=None: the last hidden state (final layer norm
        applied), padded to the tokenizer's 77 tokens, no attention mask."""
        tok, enc = self.tokenizers[0], self.text_encoders[0]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return {"prompt_embeds": enc(ids)[0].float()}

    def null_cond(self, cond: Cond) -> Cond:
        empty = getattr(self, "_empty", None)
        if empty is None or empty.device != self.device:
            empty = self._empty = self.encode_prompts([""])["prompt_embeds"]
        n = cond["prompt_embeds"].shape[0]
        return {"prompt_embeds": empty.to(cond["prompt_embeds"]).repeat(n, 1, 1)}

    def _kwargs(self, x: torch.Tensor, cond: Cond, boxes, dtype: torch.dtype) -> dict:
        # a crop is judged as an image of its own size: SD has no crop conditioning to describe it with
        return {"encoder_hidden_states": cond["prompt_embeds"].to(dtype)}
