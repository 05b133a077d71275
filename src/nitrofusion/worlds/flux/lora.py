"""FLUX LoRAs in diffusers' FLUX LoRA format: `pytorch_lora_weights.safetensors` as `FluxPipeline.save_lora_weights`
writes it (keys `transformer.<module>.lora_A.weight` / `.lora_B.weight`, the adapter's LoraConfig in the header under
`lora_adapter_metadata`, so `load_lora_weights` rebuilds the same rank, alpha and targets), plus the run's shift
(`nitrofusion.shifted_timestep`), as sd3/lora.py writes SD3's. A LoRA run's trainer writes it into run/student/lora;
`generate` puts it on the base's transformer (the training-time student exactly). `export --format lora` and LoRA
extraction from a full student are not built for FLUX yet."""

from __future__ import annotations

from pathlib import Path

import torch

from ..pipelines.export import save_transformer_lora


def save_lora_files(folder: Path, factors: dict[str, torch.Tensor], shift: int | None, metadata: dict) -> None:
    """`factors` and their LoraConfig in diffusers' FLUX LoRA format, with the shift and alpha folded into lora_B
    (worlds/pipelines/export.py `save_transformer_lora`)."""
    from diffusers import FluxPipeline

    save_transformer_lora(FluxPipeline, folder, factors, shift, metadata)
