"""What the stock SDXL pipeline costs the host per image, measured without a GPU (docs/guide/fast-inference-and-app.md):

1. its module walks (`_execution_device`, `unet.device`, `unet.dtype`, the VAE's execution device) on the FULL SDXL
   architecture, built with empty weights (accelerate's init_empty_weights: no memory, same modules);
2. the aten calls of one full-size UNet forward and VAE decode at batch 1 (counted on the meta device): each is
   host work, most of them a kernel launch on a GPU;
3. a 1-step image from the tiny random pipeline, stock call against runtime.py (same images), interleaved.

    python scripts/pipeline_overhead.py [--threads 1] [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def module_walks(repeats: int) -> dict:
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionXLPipeline

    from nitrofusion.worlds.sdxl.inference_bench import module_walks_ms
    from nitrofusion.worlds.sdxl.testing import build_sdxl_components

    with init_empty_weights():
        parts = build_sdxl_components("full")
    (te1, te2), (tok1, tok2) = parts["text_encoders"], parts["tokenizers"]
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=parts["unet"], scheduler=parts["scheduler"])
    return module_walks_ms(pipe, repeats)


@torch.no_grad()
def aten_calls() -> dict:
    from diffusers import AutoencoderKL

    from nitrofusion.worlds.sdxl.testing import _VAE, build_sdxl_unet

    with torch.device("meta"):
        unet = build_sdxl_unet("full").half()
        vae = AutoencoderKL(latent_channels=4, layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, **_VAE["full"])
        x = torch.randn(1, 4, 64, 64, dtype=torch.half)
        embeds, pooled = torch.randn(1, 77, 2048, dtype=torch.half), torch.randn(1, 1280, dtype=torch.half)
        time_ids, t = torch.randn(1, 6, dtype=torch.half), torch.tensor(249)
    out = {}
    for name, fn in (("UNet forward", lambda: unet(x, t, encoder_hidden_states=embeds,
                                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})),
                     ("VAE decode", lambda: vae.decode(x.float()))):
        with CountCalls() as count:
            fn()
        out[name] = count.calls
    return out


def stock_vs_runtime(repeats: int) -> dict:
    from nitrofusion.worlds.pipelines.runtime import SDXLRuntime
    from nitrofusion.worlds.sdxl.inference_bench import Path, _pipeline

    stock = _pipeline("tiny", torch.device("cpu"), torch.float32, 250)
    ours = copy.deepcopy(stock)
    paths = {"stock call": Path(stock, None), "runtime": Path(ours, SDXLRuntime(ours))}
    times = {name: [] for name in paths}
    for path in paths.values():
        path.generate(32, 1)
    for _ in range(repeats):
        for name, path in paths.items():
            t0 = time.perf_counter()
            path.generate(32, 1)
            times[name].append(time.perf_counter() - t0)
    return {name: round(1000 * sorted(v)[len(v) // 2], 1) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("full SDXL, stock pipeline's module walks, ms each:", module_walks(min(args.repeats, 10)))
    print("full SDXL at 512 px, batch 1, aten calls:", aten_calls())
    print(f"tiny pipeline, 1 step at 32 px, median ms over {args.repeats} ({args.threads} thread):",
          stock_vs_runtime(args.repeats))


if __name__ == "__main__":
    main()
