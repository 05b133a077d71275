"""FLUX.1 adapter (docs/method.md §8, FLUX): a FluxPipeline folder's transformer as teacher and backbone, trained as
a rectified flow.

The method core sees UNPACKED latents [B, 16, H/8, W/8], as SD3's; they are packed into 2x2-patch tokens
(`FluxPipeline._pack_latents`) only inside `unet_call` and `backbone_call`, with the position ids the pipeline builds
(`_prepare_latent_image_ids` for the image, zeros for the text). The transformer is called at timestep t / 1000 and,
when it has a guidance embedder (FLUX.1-dev), at the embedded guidance `flux.guidance` (the teacher's sampler at its
own `sampler.guidance_scale`): one forward per call, no classifier-free guidance.

FLUX.1-schnell loads too: it has no guidance embedder (`guidance_embeds` false, so no guidance is passed), and its own
sampler is 4 steps on unshifted sigmas (its scheduler has shift 1 and no dynamic shift); the teacher sampler here reads
both from its folder's scheduler config, so a schnell teacher needs flux.sampler.steps=4 and max_sequence_length 256.

Prompts are encoded by the stock pipeline's own `encode_prompt` (CLIP-L's pooled embedding, T5's states). The null
prompt (E's unconditional task) is the empty prompt's encoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError
from ...method.adapter import Cond, ModelAdapter
from ...sampling.spec import SamplerSpec
from ..pipelines.family import FLUX, check_pipeline_folder
from ..pipelines.parts import DiTParts, module_dtype
from ..pipelines.t5_cache import CachedT5, quiet_truncation
from .backbone import FluxBackbone
from .config import GUIDANCE_KEY, FluxConfig
from .tokens import ids, pack, step_in_tokens, unpack

FULL_STUDENT_LIMIT = 3_000_000_000  # transformer parameters above which a full student's memory is checked


def transformer_config(folder: Path) -> dict:
    return json.loads((folder / "transformer" / "config.json").read_text())


def check_backbone(folder: Path, cfg: FluxConfig) -> None:
    """flux.backbone_blocks against the teacher's double-stream depth, from its config.json alone (before any weights
    load)."""
    layers = transformer_config(folder).get("num_layers")
    if layers is not None and cfg.backbone_blocks > layers:
        raise ConfigError(f"flux.backbone_blocks {cfg.backbone_blocks} is more than the teacher's {layers} "
                          f"double-stream blocks ({folder / 'transformer'}); use 1..{layers}")


def transformer_parameters(config: dict) -> int:
    """The transformer's parameter count, from its config on the meta device (no memory, no weights)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_full_student_fits(folder: Path, peak_bytes: int | None) -> None:
    """A full student of a multi-billion-parameter FLUX (dev, schnell: 12B) on one process: refused before weights
    load when the memory model's peak (worlds/flux/memory.py) exceeds the visible GPU (80 GB where none is visible:
    the largest card it is sized for). FSDP (fsdp=true) shards it over several; a LoRA student (flux-dev-lora) trains
    adapters on the teacher's own transformer."""
    import torch

    if torch.cuda.is_available():
        capacity, where = torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    else:
        capacity, where = 80 * 10**9, "an 80 GB GPU (none visible here)"
    if peak_bytes is not None and peak_bytes > capacity:
        n = transformer_parameters(transformer_config(folder))
        raise ConfigError(f"a full FLUX student of {n / 1e9:.1f}B parameters needs {peak_bytes / 2**30:.0f} GiB on one "
                          f"GPU by the memory model (bench --memory --family flux), more than {capacity / 2**30:.0f} "
                          f"GiB of {where}: use student.kind=lora (the flux-dev-lora preset), or fsdp=true to shard "
                          "it over several GPUs (accelerate launch --num_processes N)")


class EmbeddedGuidanceSpec(SamplerSpec):
    """FLUX.1-dev's sampler as printed: its guidance_scale feeds the guidance embedding (one forward per step), it is
    not classifier-free guidance. Same fields and repr as SamplerSpec, so the pair cache's keys are unchanged."""

    def describe(self) -> str:
        g = f", embedded guidance {self.guidance_scale:g}" if self.guidance_scale else ""
        return f"FLUX Euler (dynamic shift) {self.steps} steps{g}"


class FluxAdapter(DiTParts, CachedT5, ModelAdapter):
    prediction_type = "flow"
    student_subfolder = "transformer"
    config_class = FluxConfig
    section = "flux"
    crop_multiple = 2  # crops are whole 2x2 token patches
    t5_attribute = "text_encoder_2"  # T5, cached with the pairs and released for training (pipelines/t5_cache.py)

    def __init__(self, folder: str | Path, cfg: FluxConfig | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        from ..pipelines.parts import load_teacher_pipeline

        folder = Path(folder)
        cfg = cfg or FluxConfig()
        check_pipeline_folder(folder, FLUX)
        check_backbone(folder, cfg)
        pipe = load_teacher_pipeline(folder, FLUX)
        self._setup(pipe, folder, cfg, device, dtype)

    def teacher_sampler(self, cfg: FluxConfig) -> SamplerSpec:
        return EmbeddedGuidanceSpec(**vars(cfg.sampler))

    def frozen_modules(self) -> list[torch.nn.Module]:
        p = self.pipe
        return [m for m in (p.text_encoder, p.text_encoder_2, p.transformer) if m is not None]

    def make_backbone(self, gradient_checkpointing: bool = False) -> torch.nn.Module:
        return FluxBackbone(self.teacher_unet, self.cfg.backbone_blocks, self.cfg.taps, gradient_checkpointing)

    def save_lora(self, folder: Path, factors: dict[str, torch.Tensor], unet_config, rank: int, shift: int,
                  alpha: float, metadata: dict) -> None:
        """diffusers' FLUX LoRA file (rank, alpha and targets in `metadata`, diffusers' adapter metadata)."""
        from .lora import save_lora_files

        save_lora_files(folder, factors, shift, metadata)

    def student_scheduler(self, shift: int):
        """TimestepShiftFlowScheduler with the student's embedded guidance in its config (pipeline.py reads it), and
        stepping in FluxPipeline's token layout (`step_in_tokens`)."""
        from ...sampling.flow_scheduler import flow_student_scheduler

        sched = flow_student_scheduler(self.scheduler_config, shift)
        sched.register_to_config(**{GUIDANCE_KEY: self.cfg.guidance})
        return step_in_tokens(sched)

    def latent_shape(self) -> tuple[int, ...]:
        return (self.teacher_unet.config.in_channels // 4, self.latent_size, self.latent_size)

    # ---- prompts ----------------------------------------------------------------------------------------------

    def _encode_live(self, prompts: list[str]) -> Cond:
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device,
                                                    max_sequence_length=self.cfg.max_sequence_length)
        return {"prompt_embeds": embeds.float(), "pooled_projections": pooled.float()}

    def _encode_with_cached_t5(self, prompts: list[str]) -> Cond:
        """`encode_prompt`'s own composition (CLIP-L's pooled embedding; T5's states as the sequence) with T5's states
        read from the pairs' cache: the live encoding bit for bit."""
        with quiet_truncation(self.pipe):
            pooled = self.pipe._get_clip_prompt_embeds(prompt=prompts, device=self.device)
        return {"prompt_embeds": self.cached_states(prompts).float(), "pooled_projections": pooled.float()}

    # ---- the network's calls -----------------------------------------------------------------------------------

    def _inputs(self, unet, x: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float | None) -> dict:
        """FluxTransformer2DModel's keyword inputs for unpacked latents x at network timestep t (1000 sigma)."""
        dtype = module_dtype(unet)
        b, _, h, w = x.shape
        embeds = cond["prompt_embeds"].to(dtype)
        txt_ids, img_ids = ids(h, w, embeds.shape[1], x.device, dtype)
        t = t.to(x.device)
        timestep = (t if t.ndim else t.expand(b)).to(dtype) / 1000  # as FluxPipeline: t in the latents' dtype, / 1000
        g = self.cfg.guidance if guidance is None else guidance
        return {"hidden_states": pack(x.to(dtype)), "timestep": timestep,
                "guidance": (torch.full([b], g, device=x.device, dtype=torch.float32)
                             if unet.config.guidance_embeds else None),
                "pooled_projections": cond["pooled_projections"].to(dtype), "encoder_hidden_states": embeds,
                "txt_ids": txt_ids, "img_ids": img_ids}

    def unet_call(self, unet, x, t, cond, guidance: float | None = None):
        """The transformer's velocity at x (unpacked); t is the network's timestep (1000 sigma), integer or float;
        `guidance`: the embedded guidance (default flux.guidance, the student's)."""
        out = unet(**self._inputs(unet, x, t, cond, guidance), return_dict=False)[0]
        return unpack(out, x.shape[-2], x.shape[-1])

    def backbone_call(self, backbone, x, t, cond, boxes):
        """A crop is judged as an image of its own size (its position ids are those of a crop-sized image)."""
        kw = self._inputs(backbone.transformer, x, t, cond, None)
        return backbone(kw["hidden_states"], kw["timestep"], kw["guidance"], kw["pooled_projections"],
                        kw["encoder_hidden_states"], kw["txt_ids"], kw["img_ids"], (x.shape[-2] // 2, x.shape[-1] // 2))

    # ---- the teacher's sampler ---------------------------------------------------------------------------------

    def _teacher_sample(self, x_T, cond, spec, generator) -> torch.Tensor:
        """FluxPipeline's own loop: the teacher's scheduler on sigmas linspace(1, 1/n, n) warped by the dynamic shift
        mu of this image's token count (`calculate_shift`; a scheduler without dynamic shifting, schnell's, ignores
        mu), Euler steps on the velocity, the guidance embedding at spec.guidance_scale. The Euler step is elementwise,
        so stepping the unpacked latents is stepping the pipeline's tokens."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        c = sched.config
        n = spec.steps
        sigmas = None if c.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        tokens = (x_T.shape[-2] // 2) * (x_T.shape[-1] // 2)
        mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        if sigmas is None:
            sched.set_timesteps(n, device=x_T.device, mu=mu)
        else:
            sched.set_timesteps(sigmas=sigmas, device=x_T.device, mu=mu)
        sched.set_begin_index(0)
        x = x_T.to(module_dtype(self.teacher_unet))
        for t in sched.timesteps:
            v = self.unet_call(self.teacher_unet, x, t.expand(x.shape[0]), cond, spec.guidance_scale)
            x = sched.step(v, t, x, return_dict=False)[0]
        return x.float()
