"""SDXL adapter: a diffusers `StableDiffusionXLPipeline` folder's two CLIP text encoders (penultimate states and
the pooled embedding), its micro-conditioning time_ids, and its null prompt: zero embeddings, pooled included
(docs/method.md §3; SDXL's own `force_zeros_for_empty_prompt`). The rest is the UNet families' shared adapter
(worlds/pipelines/unet_adapter.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...method.adapter import Cond
from ...quiet import transformers_progress_off
from ..pipelines.family import SDXL, Family
from ..pipelines.parts import load_component
from ..pipelines.unet_adapter import UNetPipelineAdapter
from .config import SDXLConfig


class SDXLAdapter(UNetPipelineAdapter):
    family: Family = SDXL

    def family_config(self) -> SDXLConfig:
        return SDXLConfig()

    def _load_text(self, folder: Path) -> tuple[list, list]:
        """SDXL's two tokenizers and text encoders (CLIP ViT-L, and OpenCLIP bigG with its projection)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers = [load_component(CLIPTokenizer, folder / name) for name in ("tokenizer", "tokenizer_2")]
        with transformers_progress_off():
            encoders = [load_component(CLIPTextModel, folder / "text_encoder"),
                        load_component(CLIPTextModelWithProjection, folder / "text_encoder_2")]
        return tokenizers, encoders

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """SDXL's prompt encoding: penultimate hidden states of both encoders, concatenated; pooled from
        the second (as StableDiffusionXLPipeline.encode_prompt with clip_skip=None)."""
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if out[0].ndim == 2:
                pooled = out[0]
        return {"prompt_embeds": torch.cat(states, dim=-1).float(), "text_embeds": pooled.float()}

    def null_cond(self, cond: Cond) -> Cond:
        return {k: torch.zeros_like(v) for k, v in cond.items()}

    def time_ids(self, x: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """Micro-conditioning (original size, crop top-left, target size) in pixels. A crop of the
        full sample is described as exactly that: the full size, the crop's corner, the crop's size [ours]."""
        s = self.vae_scale
        n, (h, w) = x.shape[0], x.shape[-2:]
        full = torch.tensor([self.latent_size * s, self.latent_size * s] if boxes is not None else [h * s, w * s])
        corner = boxes.cpu() * s if boxes is not None else torch.zeros(n, 2, dtype=torch.long)
        ids = torch.cat([full.expand(n, 2), corner, torch.tensor([h * s, w * s]).expand(n, 2)], dim=1)
        return ids.to(x.device, x.dtype)

    def _kwargs(self, x: torch.Tensor, cond: Cond, boxes, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"].to(dtype),
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"].to(dtype),
                                      "time_ids": self.time_ids(x, boxes).to(dtype)}}

