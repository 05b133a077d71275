"""SD3 / SD3.5 adapter (docs/method.md §8): a StableDiffusion3Pipeline folder's MMDiT as teacher and backbone,
trained as a rectified flow.

Prompts are encoded by the stock pipeline's own `encode_prompt` (CLIP-L and CLIP-G penultimate states padded and
stacked with T5's, and the two pooled embeddings): the student sees exactly what the pipeline feeds it. A folder
without T5 (text_encoder_3 absent, which SD3's pipeline allows) gets zeros for those tokens, as that pipeline
does. The null prompt is the empty prompt's encoding, what SD3's classifier-free guidance uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import ConfigError
from ...method.adapter import Cond, ModelAdapter
from ..pipelines.family import SD3, check_pipeline_folder
from ..pipelines.parts import DiTParts, module_dtype
from ..pipelines.t5_cache import CachedT5
from .backbone import DiTBackbone
from .config import SD3Config


def check_backbone(folder: Path, cfg: SD3Config) -> None:
    """sd3.backbone_blocks against the teacher's depth, from its config.json alone (before any weights load)."""
    layers = json.loads((folder / "transformer" / "config.json").read_text()).get("num_layers")
    if layers is not None and cfg.backbone_blocks > layers:
        raise ConfigError(f"sd3.backbone_blocks {cfg.backbone_blocks} is more than the teacher's {layers} "
                          f"transformer blocks ({folder / 'transformer'}); use 1..{layers}")


class SD3Adapter(DiTParts, CachedT5, ModelAdapter):
    prediction_type = "flow"
    student_subfolder = "transformer"
    config_class = SD3Config
    section = "sd3"
    t5_attribute = "text_encoder_3"  # T5, cached with the pairs and released for training (pipelines/t5_cache.py)

    def __init__(self, folder: str | Path, cfg: SD3Config | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        from ..pipelines.parts import load_teacher_pipeline
        from .pipeline import absent_text_parts

        folder = Path(folder)
        cfg = cfg or SD3Config()
        check_pipeline_folder(folder, SD3)
        check_backbone(folder, cfg)
        pipe = load_teacher_pipeline(folder, SD3, **absent_text_parts(folder))
        self._setup(pipe, folder, cfg, device, dtype)

    @property
    def crop_multiple(self) -> int:  # crops are whole patches
        return self.teacher_unet.config.patch_size

    def frozen_modules(self) -> list[torch.nn.Module]:
        p = self.pipe
        return [m for m in (p.text_encoder, p.text_encoder_2, p.text_encoder_3, p.transformer) if m is not None]

    def make_backbone(self, gradient_checkpointing: bool = False) -> torch.nn.Module:
        return DiTBackbone(self.teacher_unet, self.cfg.backbone_blocks, self.cfg.taps, gradient_checkpointing)

    def save_lora(self, folder: Path, factors: dict[str, torch.Tensor], unet_config, rank: int, shift: int,
                  alpha: float, metadata: dict) -> None:
        """diffusers' SD3 LoRA file (rank, alpha and targets are in `metadata`, diffusers' adapter metadata)."""
        from .lora import save_lora_files

        save_lora_files(folder, factors, shift, metadata)

    def student_scheduler(self, shift: int):
        from ...sampling.flow_scheduler import flow_student_scheduler

        return flow_student_scheduler(self.scheduler_config, shift)

    def latent_shape(self) -> tuple[int, ...]:
        return (self.teacher_unet.config.in_channels, self.latent_size, self.latent_size)

    def _encode_live(self, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.cfg.max_sequence_length)
        return {"prompt_embeds": embeds.float(), "pooled_projections": pooled.float()}

    def _encode_with_cached_t5(self, prompts: list[str]) -> Cond:
        """`encode_prompt`'s own composition (CLIP-L and CLIP-G states side by side, padded to T5's width, then
        T5's tokens after them) with T5's states read from the pairs' cache: the live encoding bit for bit."""
        p = self.pipe
        clip_l, pooled_l = p._get_clip_prompt_embeds(prompt=prompts, device=self.device, clip_model_index=0)
        clip_g, pooled_g = p._get_clip_prompt_embeds(prompt=prompts, device=self.device, clip_model_index=1)
        t5 = self.cached_states(prompts)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5], dim=-2).float(),
                "pooled_projections": torch.cat([pooled_l, pooled_g], dim=-1).float()}

    def _kwargs(self, cond: Cond, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": cond["prompt_embeds"].to(dtype),
                "pooled_projections": cond["pooled_projections"].to(dtype)}

    def unet_call(self, unet, x, t, cond):
        """The transformer's velocity at x; t is the network's timestep (1000 sigma), integer or float."""
        dtype = module_dtype(unet)
        return unet(hidden_states=x.to(dtype), timestep=t, **self._kwargs(cond, dtype)).sample

    def backbone_call(self, backbone, x, t, cond, boxes):
        """A crop is judged as an image of its own size (SD3's position embedding is centre-cropped to it)."""
        dtype = module_dtype(backbone.transformer)
        kw = self._kwargs(cond, dtype)
        return backbone(x.to(dtype), t, kw["encoder_hidden_states"], kw["pooled_projections"])
