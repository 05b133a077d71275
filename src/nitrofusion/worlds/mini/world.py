"""The embedded mini world: Fashion-MNIST 16x16, the shipped teacher, MiniLM prompts, a project-trained metric
classifier (docs/studies/demo.md)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ...data.pairs import Pairs, Prompts
from ...distill_config import DistillConfig
from ...errors import NitroFusionError
from ..base import Evaluator, GenerateOptions, LiveGenerator, ModelPlan, World, unet_plan
from .config import ASSET_TEACHER, few_step_folder, missing_teacher_file

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ...method.adapter import ModelAdapter


def _unet_config(kind: str, path: Path) -> dict | None:
    file = {"student": path / "unet" / "config.json", "unet": path / "config.json"}.get(kind)
    return json.loads(file.read_text()) if file is not None and file.is_file() else None


class MiniWorld(World):
    name = "mini"
    supported_options = ("--guidance",)  # a guided student's w (docs/method.md §10)

    def adapter(self, cfg: DistillConfig) -> ModelAdapter:
        from .adapter import MiniAdapter
        from .teacher import load_teacher

        adapter = MiniAdapter(load_teacher(cfg.teacher or None))
        if cfg.student.guidance:  # each pair at its own w, drawn from the student's range (docs/method.md §10)
            adapter.sampler = dataclasses.replace(adapter.sampler, guidance_range=list(cfg.student.guidance))
        return adapter

    def prompts(self, cfg: DistillConfig, verbose: bool = True) -> Prompts:
        from .data import class_prompts

        return class_prompts()

    def check_teacher(self, cfg: DistillConfig) -> None:
        missing = missing_teacher_file(Path(cfg.teacher) if cfg.teacher else ASSET_TEACHER)
        if missing is not None:
            raise NitroFusionError(f"teacher file missing: {missing}; give a folder written by `nitrofusion teacher "
                                   "--out DIR` or a `nitrofusion distill` run (a few-step teacher), or leave teacher "
                                   "empty for the shipped one")

    def plan_model(self, cfg: DistillConfig) -> ModelPlan:
        self.check_teacher(cfg)
        root = Path(cfg.teacher) if cfg.teacher else ASSET_TEACHER
        student = few_step_folder(root)
        what = ("the shipped mini teacher" if root == ASSET_TEACHER else
                f"mini teacher {root}" if student is None else f"few-step mini teacher {root}")
        return unet_plan(what, (root if student is None else student) / "unet", cfg)[0]

    def real_pairs(self, cfg: DistillConfig, adapter: ModelAdapter, progress: bool = True) -> Pairs:
        from .data import mini_real_pairs

        return mini_real_pairs(adapter, cfg.real.count, cfg.real.seed)

    def training_evaluator(self, cfg: DistillConfig, adapter: ModelAdapter) -> Evaluator | None:
        """The EMA student's 1-step classifier-FID and accuracy on `eval_samples` held-out prompts and x_T (the
        held-out set `evaluate` and the demo score on; no teacher samples needed)."""
        if not cfg.eval_every_images:
            return None
        from ...data.pairs import pair_inputs
        from ...method.guidance import default_scale
        from .data import class_prompts
        from .evaluation import MiniEvaluation
        from .metrics import MiniMetrics
        from .pairsets import EVAL_SEED_OFFSET

        inputs = pair_inputs(adapter, class_prompts(), cfg.eval_samples, cfg.pairs.seed + EVAL_SEED_OFFSET,
                             cfg.pairs.shard_size)
        w = default_scale(cfg.student.guidance, adapter.sampler.guidance_scale) if cfg.student.guidance else None
        evaluation = MiniEvaluation(adapter, inputs, MiniMetrics(), cfg.adversarial.shift, seed=cfg.seed, guidance=w)
        return evaluation.curve(cfg.eval_samples)

    def recognises(self, kind: str, path: Path) -> bool:
        from .text import EMBED_DIM

        config = _unet_config(kind, path)
        return config is not None and config.get("cross_attention_dim") == EMBED_DIM

    def generate_to_folder(self, model: Path, prompts: list[str], steps: int, seed: int, out: Path,
                           options: GenerateOptions) -> list[Path]:
        from .generate import generate_to_folder, student_guidance, unknown_prompts

        self.check_options(model, options)
        student_guidance(model, options.guidance, warn=False)  # a wrong path, or --guidance without a knob: one line
        unknown = unknown_prompts(prompts)
        if unknown:
            print(f"nitrofusion: warning: {len(unknown)} prompt(s) outside the mini world's 10 class prompts (e.g. "
                  f"{unknown[0]!r}); its models were trained on 'a photo of a CLASS' only", file=sys.stderr)
        return generate_to_folder(model, prompts, steps, seed, out, num_per_prompt=options.num_per_prompt,
                                  guidance=options.guidance)

    def live_generator(self, model: Path, options: GenerateOptions, size: int | None) -> tuple[LiveGenerator,
                                                                                               list[str]]:
        from ...method.guidance import with_guidance
        from ...sampling.student import generate
        from .data import class_prompts
        from .generate import guidance_settings, load_mini_student, student_guidance

        self.check_options(model, options)
        default_w = student_guidance(model, options.guidance)
        adapter, unet, shift = load_mini_student(model)

        @torch.no_grad()
        def run(prompt: str, steps: int, seed: int, guidance: float | None = None) -> Image.Image:
            gen = torch.Generator().manual_seed(seed)
            x_T = torch.randn((1, *adapter.latent_shape()), generator=gen)
            w = None if default_w is None else (default_w if guidance is None else guidance)
            x0 = generate(adapter, unet, x_T, with_guidance(adapter.encode_prompts([prompt]), w), steps, shift,
                          generator=gen)
            arr = adapter.decode(x0)[0, 0].mul(255).round().byte().numpy()
            return Image.fromarray(arr).resize((256, 256), Image.NEAREST)  # 16x16 pixels, shown large

        settings = guidance_settings(model) if default_w is not None else None
        if settings is not None:  # the app's guidance slider: the trained range, starting at the default
            run.guidance = (*settings["range"], default_w)
        return run, class_prompts()

    def evaluate(self, model: str, steps: list[int], out: Path, options: dict) -> list[str]:
        from .evaluate import evaluate_mini

        r = evaluate_mini(model, steps, out, samples=options.get("samples") or 2000, seed=options.get("seed", 0),
                          teacher=options.get("teacher"), guidance=options.get("guidance"))
        at = f" at guidance {r['guidance']:g}" if r.get("guidance") is not None else ""
        return [f"{row['model']} {row['steps']} step(s){at}: classifier-FID {row['fid']:.2f} (to teacher "
                f"{row['fid_to_teacher']:.2f}), accuracy {row['accuracy']:.3f}, precision {row['precision']:.3f}, "
                f"recall {row['recall']:.3f}, coverage {row['coverage']:.3f}" for row in r["rows"]]

    def bench(self, options: dict) -> tuple[dict, str]:
        """The mini world's training step, part by part (its step has no SDXL stages to time)."""
        from ...training.profile import format_profile

        o = options
        result = self.profile(o.get("device"), o.get("overrides"), steps=max(o["iters"], 1), warmup=o["warmup"])
        return result, format_profile(result)

    def profile(self, device: str | None = None, overrides: list[str] | None = None, steps: int = 3,
                warmup: int = 1) -> dict:
        """training/profile.py's step profile on the `mini` preset (fp32 on the CPU, or on a GPU when there is one)."""
        from ... import config as config_lib
        from ...training.profile import profile_step

        cfg = config_lib.build(DistillConfig, "distill", "mini", list(overrides or []))
        device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return profile_step(cfg, self.adapter(cfg), device_, None, self.prompts(cfg), "mini", steps, warmup)
