"""SD3 LoRAs in diffusers' SD3 LoRA format (`StableDiffusion3Pipeline.save_lora_weights`'), through the DiT families'
shared machinery (worlds/pipelines/dit_lora.py): a LoRA run's adapters handed on exactly, or a full student's
truncated SVD per Linear and Conv2d of the MMDiT."""

from __future__ import annotations

from pathlib import Path

import torch

from ..pipelines import dit_lora
from ..pipelines.dit_lora import is_lora_run, lora_file_keys, read_lora  # noqa: F401 - this family's names
from ..pipelines.family import SD3

MMDIT_LORA_COVERAGE = ("every Linear and Conv2d of the MMDiT transformer (attention q/k/v/out of the image and "
                       "text streams, feed-forward, adaLN modulations, timestep/pooled-text/caption embedders, the "
                       "patch-embedding conv, the final projection)")
SD3_LORA = dit_lora.DiTLora(family=SD3, name="SD3", transformer_class="SD3Transformer2DModel",
                            coverage=MMDIT_LORA_COVERAGE, layers="Linear/Conv2d")


def save_lora_files(folder: Path, factors: dict[str, torch.Tensor], shift: int | None, metadata: dict) -> None:
    dit_lora.save_lora_files(SD3_LORA, folder, factors, shift, metadata)


def export_lora(model: str | Path, out: str | Path, base: str | Path | None = None, rank: int | None = None,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
    return dit_lora.export_lora(SD3_LORA, model, out, base, rank, dtype, device)


def export_lines(model: str | Path, out: str | Path, options: dict) -> list[str]:
    return dit_lora.export_lines(SD3_LORA, model, out, options)


def apply_lora(pipe, path: Path, base: Path, fuse: bool = False) -> None:
    dit_lora.apply_lora(SD3_LORA, pipe, path, base, fuse)
