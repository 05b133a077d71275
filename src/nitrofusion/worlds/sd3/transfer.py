"""`nitrofusion transfer` for SD3 / SD3.5 (worlds/pipelines/dit_transfer.py): a weights file is read with diffusers'
keys or as the original layout of an SD3 single file, whose model.diffusion_model.* part alone is read."""

from __future__ import annotations

from pathlib import Path

import torch

from ...models.architectures import is_dit_weights, is_flux_weights
from ..pipelines.dit_transfer import DiTTransfer
from ..pipelines.dit_transfer import transfer as dit_transfer
from .pipeline import read_transformer_state, transformer_folder

SD3_TRANSFER = DiTTransfer(name="SD3", transformer_class="SD3Transformer2DModel",
                           is_family_file=lambda path: is_dit_weights(path) and not is_flux_weights(path),
                           read_file=lambda path, config: read_transformer_state(path))


def transfer(student: str | Path, base: str | Path, custom: str | Path, out: str | Path,
             dtype: torch.dtype | None = None) -> dict:
    return dit_transfer(SD3_TRANSFER, transformer_folder, student, base, custom, out, dtype)
