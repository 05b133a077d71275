"""FLUX LoRAs in diffusers' FLUX LoRA format (`FluxPipeline.save_lora_weights`'), through the DiT families' shared
machinery (worlds/pipelines/dit_lora.py): a LoRA run's adapters handed on exactly, or a full student's truncated SVD
per Linear of the transformer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..pipelines import dit_lora
from ..pipelines.dit_lora import read_lora  # noqa: F401 - this family's name for it
from ..pipelines.family import FLUX

FLUX_LORA_COVERAGE = ("every Linear of the FLUX transformer (attention q/k/v/out of both streams of the double blocks "
                      "and of the single blocks, feed-forwards, the single blocks' MLP in/out, AdaLN modulations, the "
                      "timestep/guidance/pooled-text embedders, the image and text token embedders, the final "
                      "projection)")
FLUX_LORA = dit_lora.DiTLora(family=FLUX, name="FLUX", transformer_class="FluxTransformer2DModel",
                             coverage=FLUX_LORA_COVERAGE, layers="Linear")


def save_lora_files(folder: Path, factors: dict[str, torch.Tensor], shift: int | None, metadata: dict) -> None:
    dit_lora.save_lora_files(FLUX_LORA, folder, factors, shift, metadata)


def export_lora(model: str | Path, out: str | Path, base: str | Path | None = None, rank: int | None = None,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
    return dit_lora.export_lora(FLUX_LORA, model, out, base, rank, dtype, device)


def export_lines(model: str | Path, out: str | Path, options: dict) -> list[str]:
    return dit_lora.export_lines(FLUX_LORA, model, out, options)


def apply_lora(pipe, path: Path, base: Path, fuse: bool = False) -> None:
    dit_lora.apply_lora(FLUX_LORA, pipe, path, base, fuse)
