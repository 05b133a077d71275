"""`nitrofusion bench --family flux`: the flux-dev-lora iteration on FLUX.1-dev's architectures with RANDOM weights
(worlds/flux/testing.py: the 11.9B FluxTransformer2DModel, CLIP-L, T5-XXL, the 16-channel VAE), initialised on the
GPU and measured by training/bench.py. T5 is released once the benchmark's pairs are made, as `distill` does (its
states are cached with the pairs), so the training rows hold what a run holds. `--size tiny` runs the same code on
the tests' tiny FLUX (with a tiny T5) on a CPU in seconds. Not yet run on a GPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import config as config_lib
from ...distill_config import DistillConfig
from ...dtypes import mixed_precision_dtype
from ...training.bench import bench_device, iteration_bench

PRESET = {"full": "flux-dev-lora", "tiny": "flux-tiny"}


def run_bench(size: str = "full", device: str | None = None, overrides: list[str] | None = None,
              iters: int = 3, warmup: int = 1, progress: Callable[[str], None] = print) -> dict:
    from .adapter import FluxAdapter
    from .testing import build_flux_pipeline

    device_ = bench_device(size, device, "FLUX.1-dev")
    sets = (["mixed_precision=no"] if device_.type == "cpu" else []) + list(overrides or [])  # CPU bf16 is slower
    cfg = config_lib.build(DistillConfig, "distill", PRESET[size], sets)
    amp = mixed_precision_dtype(cfg.mixed_precision)
    progress(f"building random-weight FLUX.1-dev ({size}, with T5) on {device_} ...")
    with torch.device(device_):  # initialised where it runs: the transformer alone is 48 GB in fp32 on the host
        pipe = build_flux_pipeline(size, t5=True, dtype=amp)
    adapter = FluxAdapter.from_pipeline(pipe, cfg.flux, device_, amp)
    result = iteration_bench(cfg, adapter, amp, device_, cfg.flux.resolution, iters, warmup, progress)
    return {"family": "FLUX.1-dev", "size": size, "preset": PRESET[size], "text_encoders": True, **result}
