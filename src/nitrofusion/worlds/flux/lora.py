"""FLUX LoRAs in diffusers' FLUX LoRA format: `pytorch_lora_weights.safetensors` as `FluxPipeline.save_lora_weights`
writes it (keys `transformer.<module>.lora_A.weight` / `.lora_B.weight`, the adapter's LoraConfig in the header under
`lora_adapter_metadata`, so `load_lora_weights` rebuilds the same rank, alpha and targets), plus the run's shift
(`nitrofusion.shifted_timestep`), as sd3/lora.py writes SD3's. A LoRA run's trainer writes it into run/student/lora;
`generate` puts it on the base's transformer (the training-time student exactly). `export --format lora` and LoRA
extraction from a full student are not built for FLUX yet."""

from __future__ import annotations

from pathlib import Path

import torch

from ..pipelines.export import PEFT_LORA_FILE
from ..pipelines.pipeline import SHIFT_METADATA_KEY


def save_lora_files(folder: Path, factors: dict[str, torch.Tensor], shift: int | None, metadata: dict) -> None:
    """`factors` (PEFT keys, `{module}.lora_A.weight`) and their LoraConfig, written by diffusers' own FLUX saver; the
    shift is added to the header diffusers wrote. An alpha other than the rank is folded into lora_B (alpha := rank),
    as sd3/lora.py does, so every loader applies the same product."""
    from diffusers import FluxPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    rank, alpha = metadata.get("r"), metadata.get("lora_alpha")
    if rank and alpha and float(alpha) != float(rank):
        scale = float(alpha) / float(rank)
        factors = {k: (v.float() * scale).to(v.dtype) if k.endswith(".lora_B.weight") else v
                   for k, v in factors.items()}
        metadata = {**metadata, "lora_alpha": rank}
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=factors, safe_serialization=True,
                                   transformer_lora_adapter_metadata=dict(metadata))
    if shift is None:
        return
    path = Path(folder) / PEFT_LORA_FILE
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata() or {})
    header[SHIFT_METADATA_KEY] = str(shift)
    save_file(load_file(str(path)), str(path), metadata=header)
