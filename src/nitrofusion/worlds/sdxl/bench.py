"""`nitrofusion bench`: what one NitroFusion training iteration and one-step generation cost at SDXL size.

Builds SDXL-architecture teacher, student and head pool with RANDOM weights (timing and memory do not
depend on the weights), runs the sdxl-realism preset's iteration at its micro-batch, and prints a table:
seconds, images/s, peak accelerator memory and achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode,
so recomputation under gradient checkpointing counts as work done). `--size tiny` runs the same code on a
CPU in seconds (for tests); its numbers say nothing about a GPU.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ... import config as config_lib
from ...data.pairs import PairLoader, generate_pairs, load_pairs
from ...distill_config import DistillConfig
from ...dtypes import mixed_precision_dtype
from ...method.step import student_one_step
from ...training.build import single_process_parts
from ...training.step import optimizer_step
from .adapter import SDXLAdapter
from .device import bench_device
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> dict:
    """Median seconds over `iters` timed calls, peak memory over all of them, FLOPs of one call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    _sync(device)
    seconds = sorted(times)[len(times) // 2]
    return {"seconds": seconds, "peak_gib": peak, "tflop": counter.get_total_flops() / 1e12,
            "tflops": counter.get_total_flops() / 1e12 / seconds}


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
    parts = single_process_parts(cfg, adapter, device_)
    student, pool, opt_g = parts.student, parts.pool, parts.opt_g
    b = cfg.micro_batch
    prompts = [f"a benchmark prompt number {i}" for i in range(b)]
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device_.type, dtype=amp, enabled=amp is not None)

    x_T = torch.randn((b, *adapter.latent_shape()), generator=gen).to(device_)
    cond = adapter.encode_prompts(prompts)

    def teacher_online():
        with autocast:
            adapter.teacher_sample(x_T, adapter.encode_prompts(prompts), generator=torch.Generator(device_))

    tmp = tempfile.TemporaryDirectory()
    generate_pairs(adapter, prompts, 2 * b, 0, tmp.name, shard_size=b, batch_size=b, device=device_,
                   progress=False, dtype=torch.float16, amp=amp)
    loader = PairLoader(load_pairs(tmp.name, in_memory=False), b, seed=0)

    def from_cache():
        x, x0, p, _ = loader.next()
        return x.to(device_), x0.to(device_), adapter.encode_prompts(p)

    def student_fwd_bwd():
        with autocast:
            x0 = student_one_step(adapter, student, x_T, cond, cfg.adversarial.shift)
        x0.float().square().mean().backward()
        opt_g.zero_grad(set_to_none=True)

    def iteration():  # one optimiser step at grad_accum 1 (training/step.py): data, D and G over 3 tasks, both
        optimizer_step(parts, from_cache, gen, 1, images=0)  # optimisers, refresh

    one = torch.randn((1, *adapter.latent_shape()), generator=gen).to(device_)
    cond1 = {k: v[:1] for k, v in cond.items()}
    t1 = torch.tensor([249], device=device_)

    @torch.no_grad()
    def gen_unet():
        with autocast:
            adapter.unet_call(adapter.teacher_unet, one, t1, cond1)

    @torch.no_grad()
    def gen_vae():
        adapter.decode(one)

    rows = []
    stages = [(f"teacher pairs, online ({adapter.sampler.describe()})", teacher_online, b),
              ("teacher pairs, from cache", from_cache, b),
              ("student forward + backward", student_fwd_bwd, b),
              ("training iteration (D + G, 3 tasks)", iteration, b),
              (f"1-step generation: UNet ({cfg.sdxl.resolution}px)", gen_unet, 1),
              (f"1-step generation: VAE decode ({cfg.sdxl.resolution}px)", gen_vae, 1)]
    for name, fn, images in stages:
        progress(f"measuring {name} ...")
        r = _measure(fn, device_, iters, warmup)
        rows.append({"stage": name, "images": images, "images_per_second": images / r["seconds"], **r})
    tmp.cleanup()
    active = len(pool.active_indices(pool.sample_active()))
    return {"device": torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu", "size": size,
            "micro_batch": b, "resolution": cfg.sdxl.resolution, "mixed_precision": cfg.mixed_precision,
            "gradient_checkpointing": cfg.gradient_checkpointing, "heads_active": active, "heads": len(pool.heads),
            "optimizer": cfg.student_optim.kind, "text_encoders": text,
            "student": cfg.student.kind if cfg.student.kind == "full" else f"lora rank {cfg.student.rank}",
            "torch": torch.__version__,
            "parameters": {"student_trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
                           "pool": sum(p.numel() for p in pool.parameters())}, "rows": rows}


def format_table(result: dict) -> str:
    head = (f"device: {result['device']}; SDXL {result['size']} random weights; micro-batch {result['micro_batch']}, "
            f"{result['resolution']}px, {result['mixed_precision']}, grad checkpointing "
            f"{result['gradient_checkpointing']}, {result['heads_active']} of {result['heads']} heads active, "
            f"student {result.get('student', 'full')}, optimiser {result['optimizer']}")
    lines = [head, "", "| stage | s | images/s | peak memory GiB | TFLOP | TFLOP/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['stage']} | {r['seconds']:.4f} | {r['images_per_second']:.2f} | {peak} | "
                     f"{r['tflop']:.3f} | {r['tflops']:.2f} |")
    if not result["text_encoders"]:
        lines.append("\n(transformers not installed: prompt embeddings were random, text-encoder time excluded)")
    return "\n".join(lines)
