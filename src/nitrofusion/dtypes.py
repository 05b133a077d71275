"""Every dtype name the project reads, in one table: the CLI's `--dtype fp16`, the config's
`mixed_precision: bf16` (accelerate's names, `no` = fp32), the pair cache's `pairs.dtype: float16` (torch's
names) and a safetensors header's `F16`."""

from __future__ import annotations

import torch

from .errors import NitroFusionError

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
