"""`nitrofusion bench --family sd3`: the sd35-medium iteration on SD3.5 medium's architectures with RANDOM weights
(worlds/sd3/testing.py: the MMDiT-X, CLIP-L, CLIP-G, T5-XXL, the 16-channel VAE), measured by training/bench.py.
T5 is released once the benchmark's pairs are made, as `distill` does (its states are cached with the pairs), so the
training rows hold what a run holds. `--size tiny` runs the same code on the tests' tiny SD3 (with a tiny T5) on a
CPU in seconds."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import config as config_lib
from ...distill_config import DistillConfig
from ...dtypes import mixed_precision_dtype
from ...training.bench import bench_device, iteration_bench

PRESET = {"full": "sd35-medium", "tiny": "sd3-tiny"}


def run_bench(size: str = "full", device: str | None = None, overrides: list[str] | None = None,
              iters: int = 3, warmup: int = 1, progress: Callable[[str], None] = print) -> dict:
    from .adapter import SD3Adapter
    from .testing import build_sd3_pipeline

    device_ = bench_device(size, device, "SD3.5")
    sets = (["mixed_precision=no"] if device_.type == "cpu" else []) + list(overrides or [])  # CPU bf16 is slower
    cfg = config_lib.build(DistillConfig, "distill", PRESET[size], sets)
    amp = mixed_precision_dtype(cfg.mixed_precision)
    progress(f"building random-weight SD3.5 medium ({size}, with T5) on {device_} ...")
    with torch.device(device_):  # initialised where it runs: T5-XXL alone is 19 GB in fp32 on the host
        pipe = build_sd3_pipeline(size, t5=True, dtype=amp)
    adapter = SD3Adapter.from_pipeline(pipe, cfg.sd3, device_, amp)
    result = iteration_bench(cfg, adapter, amp, device_, cfg.sd3.resolution, iters, warmup, progress)
    return {"family": "SD3.5 medium", "size": size, "preset": PRESET[size], "text_encoders": True, **result}
