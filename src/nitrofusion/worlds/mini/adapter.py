"""Mini-world adapter: pixel-space diffusers UNet on 16x16 Fashion-MNIST, MiniLM prompt states."""

from __future__ import annotations

from collections import OrderedDict

import torch
from diffusers import DDPMScheduler

from ...method.adapter import Cond, ModelAdapter
from ...method.guidance import timestep_cond
from ...sampling.scheduler import config_for
from . import text
from .data import class_prompts
from .teacher import MiniTeacher

MAX_PROMPTS_KEPT = 4096  # ~24 KB each: about 100 MB at most


class MiniAdapter(ModelAdapter):
    crop_multiple = 4  # two downsamplers

    def save_lora(self, folder, factors, unet_config, rank, shift, alpha, metadata) -> None:
        from ..pipelines.export import save_lora_files  # the mini UNet is a diffusers UNet2DConditionModel

        save_lora_files(folder, factors, unet_config, rank, shift, alpha=alpha, metadata=metadata)

    def __init__(self, teacher: MiniTeacher) -> None:
        self.teacher = teacher
        self.teacher_unet = teacher.unet
        self.sampler = teacher.sampler
        self.scheduler_config = dict(teacher.scheduler_config)
        sched = DDPMScheduler.from_config(config_for(DDPMScheduler, self.scheduler_config))
        self.alphas_cumprod = sched.alphas_cumprod.clone()
        self.num_train_timesteps = sched.config.num_train_timesteps
        self.prediction_type = sched.config.prediction_type
        self.resolution = teacher.model.resolution
        # the ten class prompts are encoded once (one cache file) and kept; other prompts on demand, the last
        # MAX_PROMPTS_KEPT of them kept (the live app meets a new prompt at every keystroke)
        prompts = class_prompts()
        self._classes: dict[str, torch.Tensor] = dict(zip(prompts, text.encode(prompts), strict=True))
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()

    def latent_shape(self) -> tuple[int, ...]:
        return (1, self.resolution, self.resolution)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        missing = sorted({p for p in prompts if p not in self._classes and p not in self._recent})
        found = dict(zip(missing, text.encode(missing), strict=True)) if missing else {}
        states = []
        for p in prompts:
            if p in self._classes:
                states.append(self._classes[p])
                continue
            e = found[p] if p in found else self._recent[p]
            self._recent[p] = e
            self._recent.move_to_end(p)
            states.append(e)
        while len(self._recent) > MAX_PROMPTS_KEPT:
            self._recent.popitem(last=False)
        return {"states": torch.stack(states)}

    def null_cond(self, cond: Cond) -> Cond:
        return {"states": torch.zeros_like(cond["states"])}

    def unet_call(self, unet, x, t, cond):
        return unet(x, t, encoder_hidden_states=cond["states"].to(x.dtype),
                    timestep_cond=timestep_cond(unet, cond, x.dtype)).sample

    def backbone_call(self, backbone, x, t, cond, boxes):
        return backbone(x, t, cond["states"].to(x.dtype))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().add(1).div(2).clamp(0, 1)
