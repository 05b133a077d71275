"""Train the mini world's teacher: a pixel-space UNet2DConditionModel on Fashion-MNIST, eps-prediction,
EMA weights, caption dropout so classifier-free guidance works. `nitrofusion teacher` runs this."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ... import config as config_lib
from ... import threads
from ...errors import NitroFusionError
from ...io import atomic_write_text
from ...sampling.teacher import SamplerSpec
from . import data, text
from .config import ASSET_TEACHER, TeacherTrainConfig, few_step_folder, missing_teacher_file  # noqa: F401
from .models import MiniUNetConfig, build_noise_scheduler, build_unet


@dataclass
class MiniTeacher:
    """The teacher as shipped: EMA UNet, its training noise schedule, and its default sampler."""

    unet: UNet2DConditionModel
    scheduler_config: dict
    sampler: SamplerSpec
    model: MiniUNetConfig


def save_teacher(unet: UNet2DConditionModel, cfg: TeacherTrainConfig, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    build_noise_scheduler().save_pretrained(out / "scheduler")
    meta = {"model": config_lib.to_dict(cfg.model), "sampler": config_lib.to_dict(cfg.sampler), "train": info}
    import yaml

    atomic_write_text(out / "teacher.yaml", yaml.safe_dump(meta, sort_keys=False))


def _load_unet(folder: Path, fix: str) -> UNet2DConditionModel:
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True).eval()
    except Exception as e:  # diffusers raises many types for a broken folder
        raise NitroFusionError(f"cannot load teacher UNet from {folder} ({type(e).__name__}); {fix}") from None
    return unet.requires_grad_(False)


def read_student(folder: Path, what: str = "the student", fix: str = "") -> tuple[UNet2DConditionModel, dict,
                                                                                 MiniUNetConfig]:
    """A student folder's UNet (eval mode), its TimestepShiftLCMScheduler config and the UNet's shape: what
    `generate` samples, and what a few-step teacher is made of. `fix` ends the error lines."""
    import json

    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True).eval()
    except Exception as e:  # diffusers raises many types for a broken folder
        raise NitroFusionError(f"cannot load {what} UNet in {folder / 'unet'} ({type(e).__name__}){fix}") from None
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if "shifted_timestep" not in sched:
        raise NitroFusionError(f"{folder / 'scheduler'} is not a TimestepShiftLCMScheduler config{fix}")
    c = unet.config
    model = MiniUNetConfig(resolution=c.sample_size, block_out_channels=list(c.block_out_channels),
                           layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups)
    return unet, sched, model


def _few_step_teacher(folder: Path, fix: str) -> MiniTeacher:
    """A trained student as the teacher: its UNet, and its own 4-step sampler at the shift it was trained with."""
    unet, sched, model = read_student(folder, "the few-step teacher's", f"; {fix}")
    return MiniTeacher(unet=unet.requires_grad_(False), scheduler_config=sched, model=model,
                       sampler=SamplerSpec(name="student", steps=4, guidance_scale=0.0,
                                           shift=int(sched["shifted_timestep"])))


def load_teacher(path: str | Path | None = None) -> MiniTeacher:
    """Load a teacher folder (default: the shipped one), or a `distill` run as a few-step teacher. Missing or
    broken files stop with the fix."""
    import json

    import yaml

    root = Path(path) if path else ASSET_TEACHER
    fix = ("reinstall nitrofusion, or re-create it with: nitrofusion teacher --replace-shipped"
           if root == ASSET_TEACHER else f"re-create it with: nitrofusion teacher --out {root}, or give a "
           "`nitrofusion distill` run")
    missing = missing_teacher_file(root)
    if missing is not None:
        raise NitroFusionError(f"teacher file missing: {missing}; {fix}")
    student = few_step_folder(root)
    if student is not None:
        return _few_step_teacher(student, fix)
    unet = _load_unet(root / "unet", fix)
    meta = yaml.safe_load((root / "teacher.yaml").read_text())
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return MiniTeacher(unet=unet, scheduler_config=sched,
                       sampler=config_lib.from_dict(SamplerSpec, meta["sampler"], "sampler"),
                       model=config_lib.from_dict(MiniUNetConfig, meta["model"], "model"))


def train_teacher(cfg: TeacherTrainConfig, out: Path) -> dict:
    threads.apply(cfg.threads)  # 0: the automatic rule (threads.py)
    torch.manual_seed(cfg.seed)
    images, labels = data.load_split("train", cfg.model.resolution)
    prompts = text.encode(data.class_prompts())  # [10, L, 384]
    null = text.null_embedding(1)[0]
    unet = build_unet(cfg.model).train()
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    sched = build_noise_scheduler()
    ab = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    warm = lambda it: min(1.0, (it + 1) / max(1, cfg.warmup_iterations))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warm)
    n = images.shape[0]
    deadline = time.time() + cfg.minutes * 60 if cfg.minutes > 0 else math.inf
    limit = cfg.max_iterations or 10**9
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    it, loss_avg = 0, None
    bar = tqdm(total=cfg.max_iterations or None, desc="teacher", unit="it", dynamic_ncols=True)
    while it < limit and time.time() < deadline:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        cond = prompts[y].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        cond[drop] = null
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(x_t, t, cond).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        it += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{it * cfg.batch_size / (time.time() - start):.0f}")
    bar.close()
    if it == 0:
        raise NitroFusionError("teacher training ran zero iterations; raise minutes or max_iterations")
    ema.copy_to(unet.parameters())
    info = {"iterations": it, "images": it * cfg.batch_size, "seconds": round(time.time() - start, 1),
            "final_loss_ema": round(loss_avg, 5), "seed": cfg.seed}
    save_teacher(unet.eval(), cfg, out, info)
    return info
