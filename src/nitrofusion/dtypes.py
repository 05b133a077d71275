"""Every dtype name the project reads, in one table: the CLI's `--dtype fp16`, the config's
`mixed_precision: bf16` (accelerate's names, `no` = fp32), the pair cache's `pairs.dtype: float16` (torch's
names) and a safetensors header's `F16`."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import ConfigError, NitroFusionError

# short name -> (torch dtype, torch's name, safetensors' name)
_TABLE = {
    "fp32": (torch.float32, "float32", "F32"),
    "fp16": (torch.float16, "float16", "F16"),
    "bf16": (torch.bfloat16, "bfloat16", "BF16"),
}
SHORT_NAMES = tuple(_TABLE)
TORCH_NAMES = tuple(v[1] for v in _TABLE.values())
_BY_TORCH_NAME = {v[1]: v[0] for v in _TABLE.values()}
_BY_SAFETENSORS = {v[2]: v[0] for v in _TABLE.values()} | {"F64": torch.float64}


def parse_dtype(name: str | None, flag: str = "--dtype") -> torch.dtype | None:
    """A CLI `--dtype` (fp32, fp16, bf16); None stays None (the command's default)."""
    if name is None:
        return None
    if name not in _TABLE:
        raise NitroFusionError(f"unknown {flag} {name!r}: choose {', '.join(SHORT_NAMES)}")
    return _TABLE[name][0]


def short_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (the CLI's name)."""
    return next(short for short, row in _TABLE.items() if row[0] == dtype)


def mixed_precision_dtype(mixed_precision: str) -> torch.dtype | None:
    """The half-precision dtype of accelerate's `mixed_precision` (bf16, fp16), None for `no`: the frozen
    models' weight dtype and the autocast dtype."""
    return None if mixed_precision == "no" else _TABLE[mixed_precision][0]


def torch_dtype(name: str) -> torch.dtype:
    """A dtype by torch's name (float32, float16, bfloat16), as `pairs.dtype` spells it."""
    return _BY_TORCH_NAME[name]


def safetensors_dtype(name: str, default: torch.dtype = torch.float32) -> torch.dtype:
    """A dtype by a safetensors header's name (F16, BF16, F32, F64)."""
    return _BY_SAFETENSORS.get(name, default)


def autocast(device: str | torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on the device's type; no autocast for None (mixed_precision `no`). Only network
    forward passes run under it (docs/architecture.md, precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def check_mixed_precision(mixed_precision: str, device: torch.device) -> None:
    """A run's `mixed_precision` on the device it will train on, before any model loads: bf16 needs a CUDA GPU
    with native bfloat16 (Ampere or newer; every CPU autocasts to bf16)."""
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(False):
        raise ConfigError(f"mixed_precision bf16 needs a GPU with bfloat16 (Ampere or newer); "
                          f"{torch.cuda.get_device_name(device)} has none: set mixed_precision=no")


def use_cpu() -> bool:
    """Whether a run trains on the CPU. accelerate only forms a multi-CPU (gloo) group when told `cpu`; on a machine
    without a GPU that is the only choice, so `accelerate launch --multi_gpu --num_processes N` (or torchrun) works
    there too."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()
