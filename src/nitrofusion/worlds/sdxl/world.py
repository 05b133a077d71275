"""SDXL (and SDXL-layout models): the diffusers pipeline family NitroFusion was published on
(docs/method.md §1-5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...distill_config import DistillConfig
from ...errors import NitroFusionError
from ..base import ModelPlan
from ..pipelines.family import SDXL
from ..pipelines.world import UNetPipelineWorld, teacher_folder

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ...method.adapter import ModelAdapter

EXAMPLES = ["a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk"]


class SDXLWorld(UNetPipelineWorld):
    name = "sdxl"
    family = SDXL
    examples = EXAMPLES

    def plan_model(self, cfg: DistillConfig) -> ModelPlan:
        """With the memory model's peak (worlds/sdxl/memory.py) for this teacher's UNet, text encoders and VAE."""
        from ...models.weights import header_numel

        plan, unet = self.plan_unet(cfg, need_model=True)  # the teacher checked before the training stack loads
        from .memory import run_memory

        folder = teacher_folder(cfg)
        text = [header_numel(folder / name) for name in ("text_encoder", "text_encoder_2")]
        vae = header_numel(folder / "vae")
        if None not in (*text, vae):
            weight = 2 if cfg.mixed_precision != "no" else 4
            frozen = {"text_encoders": weight * sum(text), "vae": 4 * vae}
            plan.peak_bytes = run_memory(cfg, nn.Module.to(unet, torch.bfloat16), frozen)["total"]
        return plan

    def adapter(self, cfg: DistillConfig) -> ModelAdapter:
        from .adapter import SDXLAdapter

        if not cfg.teacher:
            raise NitroFusionError("world 'sdxl' needs a teacher: --teacher DIR (a diffusers SDXL pipeline folder)")
        return SDXLAdapter(teacher_folder(cfg), cfg.sdxl)

    def recognises(self, kind: str, path: Path) -> bool:
        if kind == "file":  # a UNet file's family is its --base folder's, checked when it loads
            from ...models.architectures import is_dit_weights

            return not is_dit_weights(path)  # an SD3 transformer's file is the sd3 world's
        if kind == "pipeline":
            return json.loads((path / "model_index.json").read_text()).get("_class_name") == "StableDiffusionXLPipeline"
        return self.recognises_unet(kind, path, text_time=True)

    def bench(self, options: dict) -> tuple[dict, str]:
        """The SDXL-size training iteration with its step profile, or `inference` (stock vs fast generation), or
        `memory` (the memory model of every SDXL preset)."""
        o = options
        if o.get("inference"):
            from ...dtypes import parse_dtype
            from .inference_bench import format_inference, run_inference_bench

            result = run_inference_bench(o["size"], o.get("device"), parse_dtype(o.get("dtype")),
                                         iters=max(o["iters"], 1), warmup=o["warmup"])
            return result, format_inference(result)
        if o.get("memory"):
            from .memory import format_memory, memory_model

            result = memory_model(overrides=o.get("overrides"), fsdp=tuple(o.get("fsdp") or ()))
            return result, format_memory(result)
        from ...training.bench import bench_device

        device = bench_device(o["size"], o.get("device"))  # before the training stack loads: a refusal in seconds
        from ...training.bench import format_table
        from ...training.profile import format_profile, profile_step
        from .bench import run_bench, sdxl_setup

        result = run_bench(o["size"], o.get("device"), o.get("overrides"), iters=o["iters"], warmup=o["warmup"])
        # one micro-batch per step: the SDXL recipe's 20 would make each profiled step a minute on a GPU
        cfg, adapter, amp, _ = sdxl_setup(o["size"], device, ["grad_accum=1", *(o.get("overrides") or [])], print)
        prompts = [f"a benchmark prompt number {i}" for i in range(8)]
        result["profile"] = profile_step(cfg, adapter, device, amp, prompts, o["size"], steps=max(o["iters"], 1),
                                         warmup=o["warmup"])
        return result, format_table(result) + "\n\n" + format_profile(result["profile"])

