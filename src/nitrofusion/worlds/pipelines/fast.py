"""Fast SDXL inference (`load_pipeline(..., fast=True)`, `generate --fast`, `app --fast`): the stock diffusers
pipeline with the usual speed-ups applied in place, nothing re-implemented.

- fused QKV projections: one matmul per attention instead of three (diffusers' `fuse_qkv_projections`);
- channels_last for the UNet and the VAE (the layout cuDNN's convolutions prefer);
- torch.compile (inductor) of the UNet and of the VAE decoder, where a probe compile on the device and dtype
  succeeds; otherwise one line says why and the pipeline stays eager. The UNet is compiled by region by default
  (diffusers' `compile_repeated_blocks`: one graph for its transformer blocks, reused by all 70 of them in SDXL,
  the convolutions left to cuDNN): compiling the whole UNet and decoder at 1024 px had not finished after
  150 s on an H100; `regional=False` compiles the UNet whole;
- on a CUDA device, CUDA graphs of the text encoders, the compiled UNet and the decoder, replayed by the runtime
  (runtime.py, one graph per shape), which also skips the stock pipeline's per-call Python;
- an optional tiny VAE decoder (`--vae FOLDER`: diffusers' AutoencoderTiny, e.g. TAESDXL) in place of SDXL's.
Half precision is the pipeline's dtype (`--dtype fp16|bf16`), as for the eager path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ...dtypes import short_name
from ...errors import NitroFusionError, describe
from .runtime import SDXLRuntime, is_sdxl_pipeline, needs_upcast, set_vae_dtype

VAE_CLASSES = ("AutoencoderTiny", "AutoencoderKL")
REGIONAL_RECOMPILE_LIMIT = 64


def load_vae(folder: str | Path, dtype: torch.dtype | None = None):
    """A diffusers AutoencoderTiny or AutoencoderKL folder (config.json + weights), or a Hugging Face Hub id of one
    (hub.py); anything else is one line."""
    from .hub import local_model

    folder = local_model(folder, "--vae")
    config = folder / "config.json"
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError):
        name = None
    if name not in VAE_CLASSES:
        what = f"a {name} folder" if name else "not a diffusers model folder"
        raise NitroFusionError(f"--vae {folder} is {what}; give an AutoencoderTiny (e.g. TAESDXL) or "
                               "AutoencoderKL folder")
    import diffusers

    try:
        return getattr(diffusers, name).from_pretrained(folder, torch_dtype=dtype or torch.float32)
    except Exception as e:  # noqa: BLE001 - a truncated weights file surfaces as several types
        raise NitroFusionError(f"cannot load the VAE in {folder} ({describe(e)})") from None


def compile_problem(device: torch.device, dtype: torch.dtype, backend: str = "inductor") -> str | None:
    """Why torch.compile cannot run here (None if a probe function compiles and runs)."""
    try:
        probe = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1, fullgraph=True, backend=backend)
        probe(torch.ones(16, device=device, dtype=dtype))
        return None
    except Exception as e:  # noqa: BLE001 - no compiler, unsupported dtype/device: all mean "stay eager"
        return describe(e)


def fast_vae_dtype(pipe) -> torch.dtype | None:
    """Where SDXL's VAE cannot decode in fp16: bf16 (fp32's range, half its bytes; what ComfyUI decodes SDXL in) on
    a GPU that has it, else fp32. None: the pipeline's dtype is fine."""
    if not needs_upcast(pipe):
        return None
    device = pipe.vae.device
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def use_vae(pipe, folder: str | Path) -> None:
    """Decode with the VAE in `folder` (the pipeline's dtype and device)."""
    pipe.vae = load_vae(folder, pipe.unet.dtype).to(pipe.unet.device)


def fast_decoder(vae, compiled: bool, backend: str = "inductor") -> None:
    """A decoder as make_fast leaves it: channels_last, and `decode` compiled when `compiled`."""
    vae.to(memory_format=torch.channels_last)
    if compiled:
        vae.decode = torch.compile(vae.decode, backend=backend)


def make_fast(pipe, compile: bool = True, cuda_graphs: bool = True, backend: str = "inductor",
              regional: bool = True, vae_dtype: torch.dtype | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Apply the speed-ups to a loaded SDXL pipeline in place; returns what was applied. `backend`: torch.compile's
    (tests use "aot_eager": the same graph capture in seconds, without inductor's code generation).
    `cuda_graphs` (CUDA devices, SDXL pipelines): generation replays the text encoders, UNet and decoder from CUDA
    graphs (runtime.py), one per shape. `vae_dtype`: the decoder's precision (default: fast_vae_dtype's choice)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    tiny_vae = type(pipe.vae).__name__ == "AutoencoderTiny"
    applied = {"fused_qkv": False, "channels_last": True, "compiled": False, "tiny_vae": tiny_vae}
    try:
        pipe.fuse_qkv_projections(unet=True, vae=not tiny_vae)
        applied["fused_qkv"] = True
    except Exception as e:  # noqa: BLE001 - a processor without a fused form: keep the unfused attention
        log(f"fast: QKV projections not fused ({describe(e)})")
    vae_dtype = vae_dtype or fast_vae_dtype(pipe)
    if vae_dtype is not None:
        set_vae_dtype(pipe, vae_dtype)
    applied["vae_dtype"] = short_name(pipe.vae.dtype)
    pipe.unet.to(memory_format=torch.channels_last)
    problem = compile_problem(device, dtype, backend) if compile else None
    fast_decoder(pipe.vae, compiled=compile and problem is None, backend=backend)
    if compile:
        if problem is not None:
            log(f"fast: torch.compile cannot run on {device} in {str(dtype).removeprefix('torch.')} ({problem}); "
                "running eager with fused QKV and channels_last")
        else:
            if regional:
                # every transformer block of every UNet in the process shares one code object, so dynamo keeps one
                # graph per block shape (SDXL: two per resolution and batch size): its default limit of 8 is hit
                # by an app serving two sizes. Raise it, and no fullgraph: past the limit a block runs eager
                # (dynamo warns) instead of failing the request.
                dynamo = torch._dynamo.config
                dynamo.recompile_limit = max(dynamo.recompile_limit, REGIONAL_RECOMPILE_LIMIT)
                pipe.unet.compile_repeated_blocks(backend=backend)
            else:
                pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend=backend)
            applied["compiled"] = "regional" if regional else "whole"
    if is_sdxl_pipeline(pipe):
        # the graphs record the compiled kernels: one launch per network instead of thousands
        pipe.nitrofusion_runtime = SDXLRuntime(pipe, cuda_graphs=cuda_graphs, log=log)
        applied["cuda_graphs"] = pipe.nitrofusion_runtime.graphed
    return applied

