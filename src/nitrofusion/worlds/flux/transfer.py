"""`nitrofusion transfer` for FLUX.1 (worlds/pipelines/dit_transfer.py): a weights file is read with diffusers' keys
or in the BFL layout (what `export --format single-file` writes, flux1-dev.safetensors), converted at the width of
the transformer among the three folders (FLUX.1's 3072 when all three are files); the student's embedded guidance
travels with its shift."""

from __future__ import annotations

from pathlib import Path

import torch

from ...models.architectures import is_flux_weights
from ..pipelines.dit_transfer import DiTTransfer
from ..pipelines.dit_transfer import transfer as dit_transfer
from .config import GUIDANCE_KEY
from .pipeline import FLUX_DEV_WIDTH, GUIDANCE_METADATA_KEY, read_transformer_state, transformer_folder


def _read_file(path: Path, config: dict | None) -> dict[str, torch.Tensor]:
    width = config["num_attention_heads"] * config["attention_head_dim"] if config else FLUX_DEV_WIDTH
    return read_transformer_state(path, width)[0]


def _guidance(scheduler: dict) -> dict[str, str]:
    return {GUIDANCE_METADATA_KEY: repr(float(scheduler[GUIDANCE_KEY]))} if GUIDANCE_KEY in scheduler else {}


FLUX_TRANSFER = DiTTransfer(name="FLUX", transformer_class="FluxTransformer2DModel", is_family_file=is_flux_weights,
                            read_file=_read_file, scheduler_metadata=_guidance, metadata_keys=(GUIDANCE_METADATA_KEY,))


def transfer(student: str | Path, base: str | Path, custom: str | Path, out: str | Path,
             dtype: torch.dtype | None = None) -> dict:
    return dit_transfer(FLUX_TRANSFER, transformer_folder, student, base, custom, out, dtype)
