"""Where `nitrofusion bench` runs: checked before the training stack it measures is imported (a refusal in seconds)."""

from __future__ import annotations

import torch

from ...errors import NitroFusionError


def bench_device(size: str, device: str | None) -> torch.device:
    """The device `bench` runs on; full size on a CPU only when asked in so many words."""
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if size == "full" and device_.type == "cpu" and device is None:
        raise NitroFusionError("no GPU here: full-size SDXL takes many minutes per stage on a CPU; use --size tiny, "
                               "or --device cpu if you mean it")
    return device_
