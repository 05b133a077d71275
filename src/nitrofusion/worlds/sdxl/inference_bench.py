"""`nitrofusion bench --inference`: stock diffusers eager against our runtime and the fast path, in one run.

A random-weight SDXL pipeline (full architecture, or `--size tiny` for a CPU test) with the student's shifted
LCM scheduler, as four paths:
- stock eager: the pipeline as diffusers builds it, called as users call it;
- runtime: the same eager networks driven by runtime.py (the pipeline's images bit for bit, without its per-call
  Python: the module walks it pays per image are printed too);
- fast: make_fast (fused QKV, channels_last, torch.compile) driven by the runtime;
- fast + CUDA graphs: the same compiled networks replayed from CUDA graphs (on a CPU this is "fast" again);
- fast + CUDA graphs + tiny VAE: a random AutoencoderTiny (TAESDXL's architecture) as the decoder.
The fast paths decode SDXL's VAE in bf16 on a GPU that has it (fast.py), the stock and runtime paths in fp32.
For each resolution (1024 and 512 px; 64 and 32 for tiny), at batch 1: the first call (compilation or graph
capture included), UNet latency, VAE decode latency, end-to-end latency of 1 and 4 steps (text encoding,
sampling, decoding, PIL conversion); then images/s at batch 8 and 1 step, and the largest pixel difference of each
path's 1-step image from the stock one (0 for the runtime: same images; compiled kernels, fused QKV and a bf16
decoder move rounding; the tiny VAE is another decoder). Weights do not change timings, so random ones are fine.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ...sampling.student import shifted_scheduler
from ...training.bench import sync
from ..pipelines.fast import compile_problem, fast_decoder, make_fast
from ..pipelines.runtime import SDXLRuntime, needs_upcast
from .testing import build_sdxl_components

RESOLUTIONS = {"full": (1024, 512), "tiny": (64, 32)}


def _median_seconds(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
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


PROMPT = "a benchmark prompt"


def random_tiny_vae(size: str):
    """A random AutoencoderTiny with TAESDXL's architecture (diffusers' defaults; `--vae` loads the real one), or for
    the tiny pipeline one whose 2x upsampling matches its VAE."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    if size == "full":
        return AutoencoderTiny()
    return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))


@dataclass
class Path:
    """One way of generating: `runtime` None = the stock pipeline's own call."""

    pipe: object
    runtime: SDXLRuntime | None

    def generate(self, px: int, steps: int, batch: int = 1, seed: int = 0) -> list:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        if self.runtime is None:
            return self.pipe(prompt=[PROMPT] * batch, num_inference_steps=steps, guidance_scale=0.0, height=px,
                             width=px, generator=generators, output_type="pil").images
        return self.runtime([PROMPT] * batch, steps, generators, px, px)


def run_inference_bench(size: str = "full", device: str | None = None, dtype: torch.dtype | None = None,
                        iters: int = 5, warmup: int = 1, backend: str = "inductor", shift: int = 250,
                        progress: Callable[[str], None] = print) -> dict:
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device_.type == "cuda" else torch.float32)
    progress(f"building random-weight SDXL ({size}, {str(dtype).removeprefix('torch.')}) on {device_} ...")
    eager = _pipeline(size, device_, dtype, shift)
    walks = module_walks_ms(eager)
    progress(f"stock pipeline, per call: {walks}")
    plain, fast = copy.deepcopy(eager), copy.deepcopy(eager)
    applied = make_fast(fast, backend=backend, cuda_graphs=False, log=progress)
    tiny = _with_tiny_vae(fast, size, backend)
    paths = {"stock eager": Path(eager, None), "runtime": Path(plain, SDXLRuntime(plain, log=progress)),
             "fast": Path(fast, fast.nitrofusion_runtime),  # make_fast's own, without graphs
             "fast + CUDA graphs": Path(fast, SDXLRuntime(fast, cuda_graphs=True, log=progress)),
             "fast + CUDA graphs + tiny VAE": Path(tiny, SDXLRuntime(tiny, cuda_graphs=True, log=progress))}
    # a fixed shape per compile, as a user at one resolution gets (not the dynamic-shape graph dynamo makes
    # on the second shape it sees); the batch-8 runs come last, so a bounded run keeps every latency row. The
    # regional graph is one per block shape: 2 per resolution x 2 resolutions x 2 batch sizes, at dynamo's
    # default limit of 8 recompiles, hence a higher one
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
        rows = _measure_all(size, paths, device_, dtype, iters, warmup, progress)
    applied["cuda_graphs"] = paths["fast + CUDA graphs"].runtime.graphed
    return {"device": torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu", "size": size,
            "dtype": str(dtype).removeprefix("torch."), "fast": applied, "backend": backend, "torch": torch.__version__,
            "stock_module_walks_ms": walks, "rows": rows}


def _with_tiny_vae(fast, size: str, backend: str):
    """The fast pipeline's networks (shared, already fused and compiled: no second copy in memory) with a random
    tiny VAE, compiled as make_fast compiles a decoder."""
    from diffusers import StableDiffusionXLPipeline

    vae = random_tiny_vae(size).to(fast.unet.device, fast.unet.dtype)
    fast_decoder(vae, compiled=compile_problem(fast.unet.device, fast.unet.dtype, backend) is None, backend=backend)
    tiny = StableDiffusionXLPipeline(**{**fast.components, "vae": vae})
    tiny.set_progress_bar_config(disable=True)
    return tiny


def module_walks_ms(pipe, repeats: int = 5) -> dict:
    """What the stock call spends finding its device and dtypes, median ms each (each walks the modules; several
    are paid per image)."""
    from diffusers.utils.torch_utils import get_module_execution_device

    probes = {"_execution_device": lambda: pipe._execution_device, "unet.device": lambda: pipe.unet.device,
              "unet.dtype": lambda: pipe.unet.dtype,
              "vae execution device": lambda: get_module_execution_device(pipe.vae)}
    return {name: round(1000 * _median_seconds(probe, torch.device("cpu"), repeats), 3)
            for name, probe in probes.items()}


def _measure_all(size: str, paths: dict[str, Path], device_: torch.device, dtype: torch.dtype, iters: int,
                 warmup: int, progress: Callable[[str], None]) -> list[dict]:
    rows, reference = [], {}
    for name, path in paths.items():
        for px in RESOLUTIONS[size]:
            progress(f"measuring {name} at {px}px ...")
            row = {"path": name, "px": px, **_measure_latency(path, px, device_, dtype, iters, warmup)}
            image = np.stack([np.asarray(im, dtype=np.int16) for im in path.generate(px, 1, seed=1)])
            reference.setdefault(px, image)  # the stock path's, measured first
            row["max_pixel_diff_vs_stock"] = int(np.abs(image - reference[px]).max())
            rows.append(row)
            progress(f"  {row}")
    for row in rows:
        progress(f"measuring {row['path']} at {row['px']}px, batch 8 ...")
        try:
            row["batch8_images_per_s"] = _images_per_s(paths[row["path"]], row["px"], device_, 8, iters, warmup)
        except torch.OutOfMemoryError:  # every path's weights and graphs are resident: say so, keep the other rows
            row["batch8_images_per_s"] = float("nan")
            progress("  out of memory at batch 8")
            torch.cuda.empty_cache()
            continue
        progress(f"  {row['batch8_images_per_s']:.2f} images/s")
    return rows


def _networks(path: Path, px: int, device: torch.device, dtype: torch.dtype) -> tuple[Callable, Callable]:
    """(UNet call, VAE decode) at batch 1 as the path runs them: the stock pipeline's modules directly (its VAE in
    its own dtype), or the runtime's (graph replays on the graphed path)."""
    pipe, runtime = path.pipe, path.runtime
    latent = px // pipe.vae_scale_factor
    x = torch.randn(1, pipe.unet.config.in_channels, latent, latent, generator=torch.Generator().manual_seed(0))
    x, t = x.to(device, dtype), torch.tensor(249, device=device)
    if runtime is not None:
        embeds, pooled = runtime.prompt_embeddings([PROMPT])
        time_ids, z = runtime.time_ids(px, px, 1), (x / runtime.scaling_factor).to(runtime.vae_dtype)
        return lambda: runtime.unet(x, t, embeds, pooled, time_ids), lambda: runtime.decode(z)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[px, px, 0, 0, px, px]], device=device, dtype=dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    z = x / pipe.vae.config.scaling_factor

    def decode():  # as the stock call decodes: SDXL's VAE cast to fp32 and back around every image under fp16
        upcast = needs_upcast(pipe)
        if upcast:
            pipe.vae.to(torch.float32)
        pipe.vae.decode(z.to(pipe.vae.dtype))
        if upcast:
            pipe.vae.to(torch.float16)

    return lambda: pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added), decode


@torch.no_grad()
def _measure_latency(path: Path, px: int, device: torch.device, dtype: torch.dtype, iters: int, warmup: int) -> dict:
    unet, decode = _networks(path, px, device, dtype)
    sync(device)
    t0 = time.perf_counter()
    path.generate(px, 1)  # compiles UNet and decoder at this shape and records graphs; eager: first-call overhead
    sync(device)
    out = {"first_call_s": time.perf_counter() - t0}
    for key, fn in (("unet_ms", unet), ("vae_decode_ms", decode), ("1_step_ms", lambda: path.generate(px, 1)),
                    ("4_step_ms", lambda: path.generate(px, 4))):
        for _ in range(warmup):
            fn()
        out[key] = 1000 * _median_seconds(fn, device, iters)
    return out


@torch.no_grad()
def _images_per_s(path: Path, px: int, device: torch.device, batch: int, iters: int, warmup: int) -> float:
    for _ in range(max(warmup, 1)):  # at least one: the fast path compiles (and records) for this batch size here
        path.generate(px, 1, batch)
    return batch / _median_seconds(lambda: path.generate(px, 1, batch), device, max(1, iters // 2))


def format_inference(result: dict) -> str:
    applied = ", ".join(f"{k} {v}" for k, v in result["fast"].items())
    walks = ", ".join(f"{k} {v:.2f} ms" for k, v in result["stock_module_walks_ms"].items())
    lines = [f"device: {result['device']}; SDXL {result['size']} random weights, {result['dtype']}; fast path: "
             f"{applied}; compile backend {result['backend']}",
             f"stock pipeline's module walks, each paid at least once per call: {walks}", "",
             "| px | path | first call s | UNet ms | VAE decode ms | 1 step ms | 4 steps ms | batch 8 img/s | "
             "max pixel diff vs stock |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['px']} | {r['path']} | {r['first_call_s']:.2f} | {r['unet_ms']:.1f} | "
                     f"{r['vae_decode_ms']:.1f} | {r['1_step_ms']:.1f} | {r['4_step_ms']:.1f} | "
                     f"{r.get('batch8_images_per_s', float('nan')):.2f} | {r['max_pixel_diff_vs_stock']} |")
    for px in sorted({r["px"] for r in result["rows"]}, reverse=True):
        e = next(r for r in result["rows"] if r["px"] == px and r["path"] == "stock eager")
        for f in (r for r in result["rows"] if r["px"] == px and r["path"] != "stock eager"):
            lines.append(f"\n{px}px, 1 step end to end: {f['path']} = {100 * f['1_step_ms'] / e['1_step_ms']:.0f}% of "
                         f"stock eager; {1000 / f['1_step_ms']:.1f} images/s at batch 1")
    return "\n".join(lines)
