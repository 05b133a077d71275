"""Load a trained student (run folder or student folder) and generate PNGs in 1-4 steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from .adapters.mini import MiniAdapter
from .errors import NitroFusionError
from .mini.models import MiniUNetConfig
from .mini.teacher import MiniTeacher
from .sampling import generate
from .teachers import SamplerSpec
from .viz import save_grid


def student_folder(path: Path) -> Path:
    for cand in (path, path / "student"):
        if (cand / "unet" / "config.json").is_file() and (cand / "scheduler" / "scheduler_config.json").is_file():
            return cand
    raise NitroFusionError(f"no student in {path}: expected unet/ and scheduler/ there or under student/ "
                           "(a folder written by `nitrofusion distill` or `nitrofusion demo`)")


def load_mini_student(path: Path) -> tuple[MiniAdapter, UNet2DConditionModel, int]:
    folder = student_folder(path)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True).eval()
    except Exception as e:
        raise NitroFusionError(f"cannot load the student UNet in {folder / 'unet'} ({type(e).__name__})") from None
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if "shifted_timestep" not in sched:
        raise NitroFusionError(f"{folder / 'scheduler'} is not a TimestepShiftLCMScheduler config")
    cfg = unet.config
    model = MiniUNetConfig(resolution=cfg.sample_size, block_out_channels=list(cfg.block_out_channels),
                           layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups)
    adapter = MiniAdapter(MiniTeacher(unet=unet, scheduler_config=sched, sampler=SamplerSpec(), model=model))
    return adapter, unet, int(sched["shifted_timestep"])


@torch.no_grad()
def generate_images(model_path: Path, prompts: list[str], steps: int, seed: int,
                    num_per_prompt: int = 1) -> torch.Tensor:
    adapter, unet, shift = load_mini_student(model_path)
    prompts = [p for p in prompts for _ in range(num_per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(prompts), *adapter.latent_shape()), generator=gen)
    x0 = generate(adapter, unet, x_T, adapter.encode_prompts(prompts), steps, shift, generator=gen)
    return adapter.decode(x0)


def generate_to_folder(model_path: Path, prompts: list[str], steps: int, seed: int, out: Path,
                       num_per_prompt: int = 1) -> list[Path]:
    images = generate_images(model_path, prompts, steps, seed, num_per_prompt)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        arr = img.mul(255).round().byte().squeeze(0).numpy()
        path = out / f"{i:04d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    save_grid(out / "grid.png", [images], [f"{steps} step(s)"], scale=4)
    return paths
