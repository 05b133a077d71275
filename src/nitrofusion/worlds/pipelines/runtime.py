"""The SDXL runtime: what `StableDiffusionXLPipeline.__call__` computes for a student (no guidance, 1-4 steps of
the shifted LCM scheduler, docs/method.md §5), without the pipeline's per-call Python, and with CUDA graphs.

Why: at batch 1 the host is the bottleneck (the H100 runs in docs/guide/bench.md: the UNet cost about the same at
512 as at 1024 px). The stock call walks every module of the pipeline several times to find its device and dtype
(`_execution_device`, `unet.device`, `unet.dtype`, `get_module_execution_device`): on the full SDXL architecture
each walk takes milliseconds (`nitrofusion bench --inference` measures them), paid on every image. Here the
device, dtypes, time ids and step grids are read once; prompt embeddings are kept for recent prompts (a live app
re-renders the same prompt with another seed or step count); pixels are converted to 8 bits on the device, so a
quarter of the bytes cross to the host.

The images are the pipeline's, bit for bit (tests/test_runtime.py): the same tokenisation, penultimate hidden
states, time ids, x_T draws from the caller's generators, scheduler steps, VAE scaling and rounding.

`cuda_graphs=True` (on a CUDA device) replays the text encoders, the UNet and the VAE decoder from CUDA graphs
(cuda_graphs.py), one per shape; a shape whose capture fails runs without a graph, said in one line.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from PIL import Image

from .cuda_graphs import Capture, GraphedCall, cuda_capture

PROMPT_CACHE = 64  # prompts whose embeddings are kept (a few KB to 0.3 MB each at SDXL's size)


def is_sdxl_pipeline(pipe) -> bool:
    return type(pipe).__name__ == "StableDiffusionXLPipeline"


def runtime_for(pipe) -> SDXLRuntime:
    """The pipeline's runtime, built on first use and kept on the pipeline (make_fast may have asked for graphs)."""
    runtime = getattr(pipe, "nitrofusion_runtime", None)
    if runtime is None:
        runtime = SDXLRuntime(pipe)
        pipe.nitrofusion_runtime = runtime
    return runtime


def set_vae_dtype(pipe, dtype: torch.dtype) -> None:
    """Decode in `dtype` from now on: the VAE's weights cast once, and latents cast on entry (the stock pipelines
    hand the decoder the UNet's dtype; they cast only a VAE they upcast themselves, and re-cast its weights around
    every decode)."""
    vae = pipe.vae
    if vae.dtype == dtype and getattr(vae, "nitrofusion_decode_dtype", None) in (None, dtype):
        return
    vae.to(dtype)
    if getattr(vae, "nitrofusion_decode_dtype", None) is None:
        decode = vae.decode
        vae.decode = lambda z, *args, **kwargs: decode(z.to(vae.nitrofusion_decode_dtype), *args, **kwargs)
    vae.nitrofusion_decode_dtype = dtype


def needs_upcast(pipe) -> bool:
    """SDXL's VAE overflows in fp16: diffusers decodes it in fp32 when the pipeline is fp16."""
    return pipe.vae.dtype == torch.float16 and bool(getattr(pipe.vae.config, "force_upcast", False))


class SDXLRuntime:
    def __init__(self, pipe, cuda_graphs: bool = False, prompt_cache: int = PROMPT_CACHE,
                 log: Callable[[str], None] = print, capture: Capture | None = None):
        """`capture`: how graphs are recorded (default: CUDA's, on a CUDA device); tests pass a CPU stand-in."""
        self.pipe = pipe
        if needs_upcast(pipe):  # decode in fp32 as the pipeline does, cast once here instead of around every image
            set_vae_dtype(pipe, torch.float32)
        weight = next(pipe.unet.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        # the pipeline's own rule: SDXL's pooled embedding comes from the second encoder; without a first tokenizer
        # only the second encoder runs
        self.encoders = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder),
                                              (pipe.tokenizer_2, pipe.text_encoder_2)) if t is not None]
        self.embed_dtype = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else self.dtype
        self.projection_dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else None
        self.vae_dtype = next(pipe.vae.decoder.parameters()).dtype
        config = pipe.vae.config
        # a VAE with latent statistics (not SDXL's): the pipeline's float32 tensors, made once here
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        self.latents_stats = None if mean is None or std is None else tuple(
            torch.tensor(v).view(1, len(v), 1, 1).to(self.device) for v in (mean, std))
        self.scaling_factor = config.scaling_factor
        self.prompt_cache, self.cached = prompt_cache, OrderedDict()
        self.time_ids_by_size: dict[tuple[int, int], torch.Tensor] = {}
        self.graphed = capture is not None or (cuda_graphs and self.device.type == "cuda")
        encode, unet, decode = self._encode_ids, self._unet, self._decode
        if self.graphed:
            capture = capture or cuda_capture(torch.cuda.graph_pool_handle())
            encode = GraphedCall(encode, "text encoders", capture, log)
            unet = GraphedCall(unet, "UNet", capture, log)
            decode = GraphedCall(decode, "VAE decoder", capture, log)
        self.encode_ids, self.unet, self.decode = encode, unet, decode

    # ---- the three networks, as functions of tensors only (what a CUDA graph records) ---------------------------

    def _encode_ids(self, *ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for (_, encoder), token_ids in zip(self.encoders, ids, strict=True):
            out = encoder(token_ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
        return torch.concat(hidden, dim=-1), pooled

    def _unet(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
              time_ids: torch.Tensor) -> torch.Tensor:
        return self.pipe.unet(x, t, encoder_hidden_states=embeds, timestep_cond=None, cross_attention_kwargs=None,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(latents, return_dict=False)[0]

    # ---- one call ---------------------------------------------------------------------------------------------

    def prompt_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, pooled) for a batch of prompts, encoded together as the pipeline does (batching changes
        float rounding); recent batches are served from the cache."""
        key = tuple(prompts)
        if key in self.cached:
            self.cached.move_to_end(key)
            return self.cached[key]
        ids = [tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device) for tok, _ in self.encoders]
        embeds, pooled = self.encode_ids(*ids)
        # clones: a graph's outputs are overwritten by its next replay
        entry = embeds.to(self.embed_dtype).clone(), pooled.clone()
        self.cached[key] = entry
        if len(self.cached) > self.prompt_cache:
            self.cached.popitem(last=False)
        return entry

    def time_ids(self, height: int, width: int, batch: int) -> torch.Tensor:
        """SDXL's size conditioning: (original size, crop corner, target size) as the pipeline sets it."""
        if (height, width) not in self.time_ids_by_size:
            ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=self.embed_dtype,
                                              text_encoder_projection_dim=self.projection_dim)
            self.time_ids_by_size[height, width] = ids.to(self.device)
        return self.time_ids_by_size[height, width].repeat(batch, 1)

    @torch.no_grad()
    def latents(self, prompts: list[str], steps: int, generators: list[torch.Generator], height: int,
                width: int) -> torch.Tensor:
        """x0 latents after `steps` steps; image i draws its x_T and re-noising noise from generators[i]."""
        embeds, pooled = self.prompt_embeddings(prompts)
        batch = len(prompts)
        time_ids = self.time_ids(height, width, batch)
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        x = self.pipe.prepare_latents(batch, self.pipe.unet.config.in_channels, height, width, embeds.dtype,
                                      self.device, generators)
        for t in scheduler.timesteps:
            noise = self.unet(scheduler.scale_model_input(x, t), t, embeds, pooled, time_ids)
            x = scheduler.step(noise, t, x, generator=generators, return_dict=False)[0]
        return x

    @torch.no_grad()
    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 images (batch, height, width, 3) on the host, rounded as the pipeline's PIL conversion rounds."""
        latents = latents.to(self.vae_dtype)  # before scaling, as the pipeline does for a VAE it upcasts
        if self.latents_stats is not None:
            mean, std = (v.to(latents.dtype) for v in self.latents_stats)
            latents = latents * std / self.scaling_factor + mean
        else:
            latents = latents / self.scaling_factor
        image = self.decode(latents)
        if getattr(self.pipe, "watermark", None) is not None:
            image = self.pipe.watermark.apply_watermark(image)
        image = self.pipe.image_processor.postprocess(image, output_type="pt")  # [0, 1], the decoder's dtype
        return (image.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8).cpu()

    def __call__(self, prompts: list[str], steps: int, generators: list[torch.Generator], height: int,
                 width: int) -> list[Image.Image]:
        pixels = self.pixels(self.latents(prompts, steps, generators, height, width))
        return [Image.fromarray(image) for image in pixels.numpy()]
