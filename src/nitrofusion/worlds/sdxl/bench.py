"""`nitrofusion bench` at SDXL size: SDXL-architecture teacher, student and head pool with RANDOM weights, the
sdxl-realism preset's iteration at its micro-batch (training/bench.py measures it). `--size tiny` runs the same code
on a CPU in seconds (for tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import config as config_lib
from ...distill_config import DistillConfig
from ...dtypes import mixed_precision_dtype
from ...training.bench import bench_device, iteration_bench
from .adapter import SDXLAdapter
from .testing import build_sdxl_components


class _UntokenizedSDXL(SDXLAdapter):
    """For machines without transformers (the lent GPUs): prompt embeddings drawn at random with SDXL's
    shapes. The text encoders' cost (~2% of an iteration) is then missing from the table, and it says so."""

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        cfg = self.teacher_unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        gen = torch.Generator().manual_seed(len(prompts))
        return {"prompt_embeds": torch.randn(len(prompts), 77, cfg.cross_attention_dim, generator=gen).to(self.device),
                "text_embeds": torch.randn(len(prompts), pooled, generator=gen).to(self.device)}


def sdxl_setup(size: str, device_: torch.device, overrides: list[str] | None, progress: Callable[[str], None]):
    """(config, adapter, autocast dtype, text encoders present) of a random-weight SDXL for the benches."""
    sets = list(overrides or [])
    if size == "tiny":
        sets = ["sdxl.resolution=64", "pool.width=8", *sets]
    if device_.type == "cpu":
        sets = ["mixed_precision=no", *sets]  # CPU bf16 autocast is slower than fp32
    cfg = config_lib.build(DistillConfig, "distill", "sdxl-realism", sets)
    try:
        import transformers  # noqa: F401

        text = True
    except ImportError:
        text = False
    progress(f"building random-weight SDXL ({size}) on {device_} ...")
    parts = build_sdxl_components(size, text=text)
    cls = SDXLAdapter if text else _UntokenizedSDXL
    adapter = cls.from_components(parts["tokenizers"], parts["text_encoders"], parts["unet"], parts["vae"],
                                  dict(parts["scheduler"].config), cfg.sdxl)
    return cfg, adapter, mixed_precision_dtype(cfg.mixed_precision), text


def run_bench(size: str = "full", device: str | None = None, overrides: list[str] | None = None,
              iters: int = 3, warmup: int = 1, progress: Callable[[str], None] = print) -> dict:
    device_ = bench_device(size, device)
    cfg, adapter, amp, text = sdxl_setup(size, device_, overrides, progress)
    result = iteration_bench(cfg, adapter, amp, device_, cfg.sdxl.resolution, iters, warmup, progress)
    return {"family": "SDXL", "size": size, "text_encoders": text, **result}
