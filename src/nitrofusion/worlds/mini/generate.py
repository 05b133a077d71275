"""Load a trained student (run folder or student folder) and generate PNGs in 1-4 steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from ...errors import NitroFusionError
from ...method.guidance import GUIDANCE_FILE, with_guidance
from ...sampling.student import generate
from ...sampling.teacher import SamplerSpec
from .adapter import MiniAdapter
from .config import find_student
from .teacher import MiniTeacher, read_student


def student_folder(path: Path) -> Path:
    found = find_student(path)
    if found is not None:
        return found
    raise NitroFusionError(f"no student in {path}: expected unet/ and scheduler/ there or under student/ "
                           "(a folder written by `nitrofusion distill` or `nitrofusion demo`)")


def load_mini_student(path: Path) -> tuple[MiniAdapter, UNet2DConditionModel, int]:
    unet, sched, model = read_student(student_folder(path))
    adapter = MiniAdapter(MiniTeacher(unet=unet, scheduler_config=sched, sampler=SamplerSpec(), model=model))
    return adapter, unet, int(sched["shifted_timestep"])


def guidance_settings(path: Path) -> dict | None:
    """A guided student's {"range": [w_min, w_max], "default": w} (docs/method.md §10), read from its folder's JSON
    files before any weight loads; None for a student frozen at its teacher's one guidance scale."""
    folder = student_folder(path)
    config = json.loads((folder / "unet" / "config.json").read_text())
    file = folder / GUIDANCE_FILE
    return json.loads(file.read_text()) if file.is_file() and config.get("time_cond_proj_dim") else None


def student_guidance(path: Path, w: float | None, warn: bool = True) -> float | None:
    """The w to sample `path`'s student at: `w`, or the student's default; None for an unguided student, which
    refuses a `w` in one line. A w outside the trained range is extrapolation: allowed, with a warning."""
    settings = guidance_settings(path)
    if settings is None:
        if w is not None:
            raise NitroFusionError(f"--guidance {w:g}: {path} was trained without student.guidance, so its guidance "
                                   "scale is fixed; drop --guidance, or distil with student.guidance=[w_min, w_max]")
        return None
    lo, hi = settings["range"]
    if warn and w is not None and not lo <= w <= hi:
        print(f"nitrofusion: warning: --guidance {w:g} is outside the range [{lo:g}, {hi:g}] {path} was trained on; "
              "its images there are extrapolation", file=sys.stderr)
    return float(settings["default"]) if w is None else float(w)


@torch.no_grad()
def generate_images(model_path: Path, prompts: list[str], steps: int, seed: int,
                    num_per_prompt: int = 1, guidance: float | None = None) -> torch.Tensor:
    """Image i (prompts repeated num_per_prompt times) takes its x_T and its re-noising noise from a generator
    seeded seed + i, as on the SDXL path: one image does not depend on the others in its batch. `guidance`: a
    guided student's w (default: its own)."""
    w = student_guidance(model_path, guidance)
    adapter, unet, shift = load_mini_student(model_path)
    prompts = [p for p in prompts for _ in range(num_per_prompt)]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    x_T = torch.cat([torch.randn((1, *adapter.latent_shape()), generator=g) for g in gens])
    x0 = generate(adapter, unet, x_T, with_guidance(adapter.encode_prompts(prompts), w), steps, shift, generator=gens)
    return adapter.decode(x0)


def unknown_prompts(prompts: list[str]) -> list[str]:
    """Prompts a mini-world model never saw: it was trained on the 10 class prompts only."""
    from .data import class_prompts

    known = set(class_prompts())
    return [p for p in dict.fromkeys(prompts) if p not in known]


def generate_to_folder(model_path: Path, prompts: list[str], steps: int, seed: int, out: Path,
                       num_per_prompt: int = 1, guidance: float | None = None) -> list[Path]:
    from ...evaluation.viz import save_images

    images = generate_images(model_path, prompts, steps, seed, num_per_prompt, guidance)
    arrays = images.mul(255).round().byte().squeeze(1).numpy()
    repeated = [p for p in prompts for _ in range(num_per_prompt)]
    return save_images([Image.fromarray(a) for a in arrays], repeated, out, steps, seed, num_per_prompt)
