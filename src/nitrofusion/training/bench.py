"""`nitrofusion bench`: what one NitroFusion training iteration and one-step generation cost, for any family whose
random-weight full-size models a world builds (worlds/sdxl/bench.py, worlds/sd3/bench.py).

Runs the preset's iteration at its micro-batch and prints a table: seconds, images/s, peak accelerator memory and
achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode, so recomputation under gradient checkpointing counts as
work done). Timing and memory do not depend on the weights. `--size tiny` runs the same code on a CPU in seconds
(for tests); its numbers say nothing about a GPU.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import NitroFusionError


def bench_device(size: str, device: str | None, what: str = "SDXL") -> torch.device:
    """The device `bench` runs on; full size on a CPU only when asked in so many words (checked before the training
    stack it measures is imported: a refusal in seconds)."""
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if size == "full" and device_.type == "cpu" and device is None:
        raise NitroFusionError(f"no GPU here: full-size {what} takes many minutes per stage on a CPU; use --size tiny, "
                               "or --device cpu if you mean it")
    return device_


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> dict:
    """Median seconds over `iters` timed calls, peak memory over all of them, FLOPs of one call."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    sync(device)
    seconds = sorted(times)[len(times) // 2]
    return {"seconds": seconds, "peak_gib": peak, "tflop": counter.get_total_flops() / 1e12,
            "tflops": counter.get_total_flops() / 1e12 / seconds}


def iteration_bench(cfg, adapter, amp: torch.dtype | None, device: torch.device, resolution: int,
                    iters: int = 3, warmup: int = 1, progress: Callable[[str], None] = print) -> dict:
    """Each stage of one iteration of run `cfg` on `adapter` (already on `device`): teacher pairs online and from a
    cache, the student's forward and backward, the whole optimiser step, one-step generation's denoiser and VAE.
    A family that caches prompt states with its pairs (SD3's T5) releases that encoder once the pairs are made, as
    `distill` does, so the iteration's memory is a training run's."""
    from ..data.pair_cache import attach_text_cache
    from ..data.pairs import PairLoader, generate_pairs, load_pairs
    from ..method.step import student_one_step
    from .build import single_process_parts
    from .step import optimizer_step

    parts = single_process_parts(cfg, adapter, device)
    student, pool, opt_g = parts.student, parts.pool, parts.opt_g
    b = cfg.micro_batch
    prompts = [f"a benchmark prompt number {i}" for i in range(b)]
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    x_T = torch.randn((b, *adapter.latent_shape()), generator=gen).to(device)

    def teacher_online():
        with autocast:
            adapter.teacher_sample(x_T, adapter.encode_prompts(prompts), generator=torch.Generator(device))

    tmp = tempfile.TemporaryDirectory()
    progress(f"measuring teacher pairs, online ({adapter.sampler.describe()}) ...")
    online = measure(teacher_online, device, iters, warmup)
    generate_pairs(adapter, prompts, 2 * b, 0, tmp.name, shard_size=b, batch_size=b, device=device,
                   progress=False, dtype=torch.float16, amp=amp)
    pairs = load_pairs(tmp.name, in_memory=False)
    cond = adapter.encode_prompts(prompts)  # all of them, while every encoder is here
    attach_text_cache(adapter, Path(tmp.name), None)
    released = adapter.release_cached_encoders()
    loader = PairLoader(pairs, b, seed=0)

    def from_cache():
        x, x0, p, _ = loader.next()
        return x.to(device), x0.to(device), adapter.encode_prompts(p)

    def student_fwd_bwd():
        with autocast:
            x0 = student_one_step(adapter, student, x_T, cond, cfg.adversarial.shift)
        x0.float().square().mean().backward()
        opt_g.zero_grad(set_to_none=True)

    def iteration():  # one optimiser step at grad_accum 1 (training/step.py): data, D and G over 3 tasks, both
        optimizer_step(parts, from_cache, gen, 1, images=0)  # optimisers, refresh

    one = torch.randn((1, *adapter.latent_shape()), generator=gen).to(device)
    cond1 = {k: v[:1] for k, v in cond.items()}
    t1 = torch.tensor([249], device=device)

    @torch.no_grad()
    def gen_denoiser():
        with autocast:
            adapter.unet_call(adapter.teacher_unet, one, t1, cond1)

    @torch.no_grad()
    def gen_vae():
        adapter.decode(one)

    rows = [{"stage": f"teacher pairs, online ({adapter.sampler.describe()})", "images": b,
             "images_per_second": b / online["seconds"], **online}]
    stages = [("teacher pairs, from cache", from_cache, b),
              ("student forward + backward", student_fwd_bwd, b),
              ("training iteration (D + G, 3 tasks)", iteration, b),
              (f"1-step generation: denoiser ({resolution}px)", gen_denoiser, 1),
              (f"1-step generation: VAE decode ({resolution}px)", gen_vae, 1)]
    for name, fn, images in stages:
        progress(f"measuring {name} ...")
        r = measure(fn, device, iters, warmup)
        rows.append({"stage": name, "images": images, "images_per_second": images / r["seconds"], **r})
    tmp.cleanup()
    active = len(pool.active_indices(pool.sample_active()))
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "micro_batch": b, "resolution": resolution, "mixed_precision": cfg.mixed_precision,
            "gradient_checkpointing": cfg.gradient_checkpointing, "heads_active": active, "heads": len(pool.heads),
            "optimizer": cfg.student_optim.kind, "released_text_encoder_bytes": released,
            "student": cfg.student.kind if cfg.student.kind == "full" else f"lora rank {cfg.student.rank}",
            "torch": torch.__version__,
            "parameters": {"student_trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
                           "pool": sum(p.numel() for p in pool.parameters())}, "rows": rows}


def format_table(result: dict) -> str:
    head = (f"device: {result['device']}; {result.get('family', 'SDXL')} {result['size']} random weights; micro-batch "
            f"{result['micro_batch']}, {result['resolution']}px, {result['mixed_precision']}, grad checkpointing "
            f"{result['gradient_checkpointing']}, {result['heads_active']} of {result['heads']} heads active, "
            f"student {result.get('student', 'full')}, optimiser {result['optimizer']}")
    lines = [head, "", "| stage | s | images/s | peak memory GiB | TFLOP | TFLOP/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['stage']} | {r['seconds']:.4f} | {r['images_per_second']:.2f} | {peak} | "
                     f"{r['tflop']:.3f} | {r['tflops']:.2f} |")
    if result.get("released_text_encoder_bytes"):
        lines.append(f"\n(T5 released after the pairs were made, as `distill` does: "
                     f"{result['released_text_encoder_bytes'] / 2**30:.2f} GiB not resident in the training rows)")
    if not result.get("text_encoders", True):
        lines.append("\n(transformers not installed: prompt embeddings were random, text-encoder time excluded)")
    return "\n".join(lines)
