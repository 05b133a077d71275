"""Where one optimiser step's time goes (`nitrofusion bench --size mini`, and with every SDXL bench).

Runs the training step exactly as the loop composes it (training/step.py: heads sampled once, `grad_accum` adversarial
micro-steps, both optimisers, the refresh) on the preset's micro-batch, with a `Stopwatch` over the named
sections that method/step.py marks: the student's forward and backward, E's forward per task for the real and
the fake view, E's backward per task (the G gradient on its way to the student), the heads for G and D, and
here the data, the optimisers and the refresh. Inputs are random tensors of the right shapes: time does not
depend on the data. Also: FLOPs per step (torch's FlopCounterMode), the achieved FLOP/s, and the machine's
measured matmul peak to set them against.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..distill_config import DistillConfig
from ..method.adapter import ModelAdapter
from ..method.guidance import draw_scales, with_guidance
from ..stopwatch import Stopwatch
from .build import single_process_parts
from .step import optimizer_step


def matmul_peak(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """FLOP/s of a large square matmul here (the best of 5): the machine's practical ceiling."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = dtype or torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def profile_step(cfg: DistillConfig, adapter: ModelAdapter, device_: torch.device, amp: torch.dtype | None,
                 prompts: list[str], size: str, steps: int = 3, warmup: int = 1,
                 progress: Callable[[str], None] = print) -> dict:
    """Profile `steps` optimiser steps of the run `cfg` on `adapter` (a world's bench sets both up); `size` labels
    the report."""
    torch.manual_seed(0)
    parts = single_process_parts(cfg, adapter, device_)
    gen = torch.Generator().manual_seed(0)
    b = cfg.micro_batch
    shape = (b, *adapter.latent_shape())

    def batch():
        x_T, x0 = torch.randn(shape, generator=gen).to(device_), torch.randn(shape, generator=gen).to(device_)
        names = [prompts[i % len(prompts)] for i in range(b)]
        w = draw_scales(b, cfg.student.guidance, gen) if cfg.student.guidance else None  # a guided student's rows
        return x_T, x0, with_guidance({k: v.to(device_) for k, v in adapter.encode_prompts(names).items()}, w)

    def one_step() -> None:  # the trainer's own optimiser step (training/step.py), its sections timed
        optimizer_step(parts, batch, gen, cfg.grad_accum, images=cfg.multistep.start_images)

    progress(f"profiling {steps} optimiser steps ({size}, micro-batch {b} x {cfg.grad_accum}) ...")
    for _ in range(warmup):
        one_step()
    times = []
    with Stopwatch(device_) as watch:
        for _ in range(steps):
            watch.sync()
            t0 = time.perf_counter()
            one_step()
            watch.sync()
            times.append(time.perf_counter() - t0)
    counter = FlopCounterMode(display=False)
    with counter:
        one_step()
    step_s = sorted(times)[len(times) // 2]
    total = sum(times)
    rows = [{"part": name, "ms": 1000 * t / steps, "share": t / total}
            for name, t in sorted(watch.totals.items(), key=lambda kv: -kv[1])]
    other = total - sum(watch.totals.values())
    rows.append({"part": "other (Python, loss bookkeeping)", "ms": 1000 * other / steps, "share": other / total})
    flops = counter.get_total_flops()
    peak = matmul_peak(device_, amp)
    images = b * cfg.grad_accum
    return {"device": torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu", "size": size,
            "threads": torch.get_num_threads(), "images_per_step": images, "step_seconds": step_s,
            "images_per_second": images / step_s, "tflop_per_step": flops / 1e12,
            "achieved_tflops": flops / 1e12 / step_s, "matmul_peak_tflops": peak / 1e12, "rows": rows}


def format_profile(r: dict) -> str:
    lines = [f"one optimiser step, {r['size']} on {r['device']} ({r['threads']} threads): {r['images_per_step']} "
             f"images in {r['step_seconds']:.3f} s = {r['images_per_second']:.1f} images/s; "
             f"{r['tflop_per_step'] * 1e3:.1f} GFLOP per step, {r['achieved_tflops'] * 1e3:.1f} GFLOP/s achieved "
             f"against a measured matmul peak of {r['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s "
             f"({100 * r['achieved_tflops'] / r['matmul_peak_tflops']:.0f}%)", "",
             "| part | ms per step | share |", "|---|---:|---:|"]
    lines += [f"| {x['part']} | {x['ms']:.1f} | {100 * x['share']:.1f}% |" for x in r["rows"]]
    return "\n".join(lines)
