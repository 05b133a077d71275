"""`nitrofusion bench --inference`: stock diffusers eager against the fast path (fast.py), in one run.

A random-weight SDXL pipeline (full architecture, or `--size tiny` for a CPU test) with the student's shifted
LCM scheduler, three times: as diffusers builds it, with `make_fast` applied, and with `make_fast(cuda_graphs=True)`
(CUDA graphs replay each compiled block's kernels in one launch: at batch 1 the GPU waits for the host's kernel
launches, measured on an H100; on a CPU this third path is the second again). For each resolution (1024 and 512
px; 64 and 32 for tiny; CUDA graphs at the smaller only, where launches dominate), at batch 1: the first call
(compilation included), UNet latency, VAE decode latency, end-to-end latency of 1 and 4 steps (text encoding,
sampling, decoding, PIL conversion); then images/s at batch 8 and 1 step. Weights do not change timings, so
random ones are fine.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch

from ...sampling.student import shifted_scheduler
from .bench import _sync
from .fast import make_fast
from .testing import build_sdxl_components

RESOLUTIONS = {"full": (1024, 512), "tiny": (64, 32)}


def _median_seconds(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _pipeline(size: str, device: torch.device, dtype: torch.dtype, shift: int):
    from diffusers import StableDiffusionXLPipeline

    parts = build_sdxl_components(size, dtype=dtype)
    te1, te2 = parts["text_encoders"]
    tok1, tok2 = parts["tokenizers"]
    scheduler = shifted_scheduler(dict(parts["scheduler"].config), shift)
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=parts["unet"], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_inference_bench(size: str = "full", device: str | None = None, dtype: torch.dtype | None = None,
                        iters: int = 5, warmup: int = 1, backend: str = "inductor", shift: int = 250,
                        progress: Callable[[str], None] = print) -> dict:
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device_.type == "cuda" else torch.float32)
    progress(f"building random-weight SDXL ({size}, {str(dtype).removeprefix('torch.')}) on {device_} ...")
    eager = _pipeline(size, device_, dtype, shift)
    fast, graphed = copy.deepcopy(eager), copy.deepcopy(eager)
    applied = make_fast(fast, backend=backend, log=progress)
    make_fast(graphed, backend=backend, cuda_graphs=True, log=progress)
    # a fixed shape per compile, as a user at one resolution gets (not the dynamic-shape graph dynamo makes
    # on the second shape it sees); the batch-8 runs come last, so a bounded run keeps every latency row. The
    # regional graph is one per block shape: 2 per resolution x 2 resolutions x 2 batch sizes, at dynamo's
    # default limit of 8 recompiles, hence a higher one
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
        rows = _measure_all(size, {"stock eager": eager, "fast": fast, "fast + CUDA graphs": graphed}, device_,
                            dtype, iters, warmup, progress)
    return {"device": torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu", "size": size,
            "dtype": str(dtype).removeprefix("torch."), "fast": applied, "backend": backend, "torch": torch.__version__,
            "rows": rows}


def _measure_all(size: str, pipes: dict, device_: torch.device, dtype: torch.dtype, iters: int, warmup: int,
                 progress: Callable[[str], None]) -> list[dict]:
    rows = []
    for name, pipe in pipes.items():
        for px in RESOLUTIONS[size] if "CUDA graphs" not in name else RESOLUTIONS[size][-1:]:
            progress(f"measuring {name} at {px}px ...")
            rows.append({"path": name, "px": px, **_measure_latency(pipe, px, device_, dtype, iters, warmup)})
            progress(f"  {rows[-1]}")
    for row in rows:
        pipe = pipes[row["path"]]
        progress(f"measuring {row['path']} at {row['px']}px, batch 8 ...")
        row["batch8_images_per_s"] = _images_per_s(pipe, row["px"], device_, 8, iters, warmup)
        progress(f"  {row['batch8_images_per_s']:.2f} images/s")
    return rows


def _end_to_end(pipe, px: int, steps: int, batch: int = 1) -> Callable[[], object]:
    return lambda: pipe(prompt=["a benchmark prompt"] * batch, num_inference_steps=steps, guidance_scale=0.0,
                        height=px, width=px, output_type="pil")


@torch.no_grad()
def _measure_latency(pipe, px: int, device: torch.device, dtype: torch.dtype, iters: int, warmup: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    latent = px // pipe.vae_scale_factor
    x = torch.randn(1, pipe.unet.config.in_channels, latent, latent, generator=gen).to(device, dtype)
    embeds, pooled = pipe.encode_prompt("a benchmark prompt", device=device, do_classifier_free_guidance=False)[::2]
    time_ids = torch.tensor([[px, px, 0, 0, px, px]], device=device, dtype=dtype)
    t = torch.tensor([249], device=device)

    def unet():
        pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})

    def vae():
        pipe.vae.decode((x / pipe.vae.config.scaling_factor).to(pipe.vae.dtype))

    _sync(device)
    t0 = time.perf_counter()
    _end_to_end(pipe, px, 1)()  # compiles UNet and decoder at this shape (fast path); eager: first-call overhead
    _sync(device)
    out = {"first_call_s": time.perf_counter() - t0}
    for key, fn in (("unet_ms", unet), ("vae_decode_ms", vae), ("1_step_ms", _end_to_end(pipe, px, 1)),
                    ("4_step_ms", _end_to_end(pipe, px, 4))):
        for _ in range(warmup):
            fn()
        out[key] = 1000 * _median_seconds(fn, device, iters)
    return out


@torch.no_grad()
def _images_per_s(pipe, px: int, device: torch.device, batch: int, iters: int, warmup: int) -> float:
    run = _end_to_end(pipe, px, 1, batch)
    for _ in range(max(warmup, 1)):  # at least one: the fast path compiles for this batch size here
        run()
    return batch / _median_seconds(run, device, max(1, iters // 2))


def format_inference(result: dict) -> str:
    applied = ", ".join(f"{k} {v}" for k, v in result["fast"].items())
    lines = [f"device: {result['device']}; SDXL {result['size']} random weights, {result['dtype']}; fast path: "
             f"{applied}; compile backend {result['backend']}", "",
             "| px | path | first call s | UNet ms | VAE decode ms | 1 step ms | 4 steps ms | batch 8 img/s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['px']} | {r['path']} | {r['first_call_s']:.2f} | {r['unet_ms']:.1f} | "
                     f"{r['vae_decode_ms']:.1f} | {r['1_step_ms']:.1f} | {r['4_step_ms']:.1f} | "
                     f"{r.get('batch8_images_per_s', float('nan')):.2f} |")
    for px in sorted({r["px"] for r in result["rows"]}, reverse=True):
        e = next(r for r in result["rows"] if r["px"] == px and r["path"] == "stock eager")
        for f in (r for r in result["rows"] if r["px"] == px and r["path"] != "stock eager"):
            lines.append(f"\n{px}px, 1 step end to end: {f['path']} = {100 * f['1_step_ms'] / e['1_step_ms']:.0f}% of "
                         f"stock eager; {1000 / f['1_step_ms']:.1f} images/s at batch 1")
    return "\n".join(lines)
