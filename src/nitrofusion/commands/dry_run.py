"""`distill --dry-run` / `pairs --dry-run`: everything that can be checked without training, from configs and file
headers only (no weight is read, nothing is written), then the plan a user reads before renting GPUs."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NitroFusionError

GiB = 1024**3


def _processes() -> int:
    """The processes `accelerate launch` / torchrun started (their WORLD_SIZE), 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_out_folder(out: Path, resume: bool) -> str:
    """A run folder the command could write, without writing: one line of what it is."""
    if out.exists() and not out.is_dir():
        raise NitroFusionError(f"--out {out} is an existing file; give a folder path")
    checkpoints = sorted((out / "checkpoints").glob("step-*")) if out.is_dir() else []
    if checkpoints and not resume:
        raise NitroFusionError(f"{out} already holds a run (checkpoints/); add --resume to continue it or choose a "
                               "new --out")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NitroFusionError(f"cannot write to the run folder {out}: {existing} is a file; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NitroFusionError(f"cannot write to the run folder {out} ({existing} is not writable); choose another "
                               "--out or fix its permissions")
    if resume:
        return f"{out}: resuming from {checkpoints[-1].name}" if checkpoints else f"{out}: no checkpoint, starts anew"
    return f"{out}: {'exists, empty of runs' if out.exists() else 'new'}"


def _device_line(peak: int | None) -> str:
    import torch

    if not torch.cuda.is_available():
        where = "no GPU visible here"
        return f"predicted peak {peak / GiB:.1f} GiB per GPU (a lower bound); {where}" if peak else where
    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    if peak is None:
        return f"{name}, {total / GiB:.0f} GiB (this world has no memory model)"
    fits = "fits" if peak < total else "does NOT fit"
    return f"predicted peak {peak / GiB:.1f} GiB (a lower bound) on {name} with {total / GiB:.1f} GiB: {fits}"


def dry_run(cfg, out: Path | None, resume: bool, command: str) -> None:
    """Check `cfg` for `command` (distill or pairs) as far as files allow; print the plan."""
    import torch

    from ..data.pairs import shards_read
    from ..dtypes import check_mixed_precision, use_cpu
    from ..models.student import read_student_init
    from ..worlds import world_of_config

    processes = _processes()
    device = torch.device("cpu" if use_cpu() else "cuda")
    check_mixed_precision(cfg.mixed_precision, device)
    world = world_of_config(cfg)
    world.check_config(cfg)
    plan = world.plan_model(cfg)
    if command == "distill":
        read_student_init(cfg, header_only=True)
    prompts = world.prompts(cfg, verbose=False)  # streams the source once: an unusable one fails here
    counted = f"{len(prompts):,}" if isinstance(prompts, list) else prompts.stats.summary()
    lines = [f"world: {cfg.world}; teacher: {plan.teacher} ({plan.parameters:,} parameters)",
             f"prompts: {counted}" + (f" from {cfg.prompts.source}" if cfg.prompts.source else " (the classes)")]
    p = cfg.pairs
    if p.online:
        lines.append("teacher pairs: sampled online during training (no cache)")
    else:
        shards = shards_read(cfg, processes) if command == "distill" else None
        made = (f"{len(shards):,} of its {p.shards:,} shards (those the budget reads)" if shards
                else f"{p.shards:,} shards")
        lines.append(f"teacher pairs: {p.count:,} ({p.dtype}), {made} of {p.shard_size:,}")
    if command == "distill":
        per_step = cfg.micro_batch * cfg.grad_accum * processes
        budget = (f"{cfg.max_images:,} images = {-(-cfg.max_images // per_step):,} optimiser steps"
                  if cfg.max_images else f"{cfg.max_minutes:g} minutes")
        lines.append(f"budget: {budget} of micro-batch {cfg.micro_batch} x {cfg.grad_accum} accumulation x "
                     f"{processes} process{'es' if processes > 1 else ''} = {per_step} images per step")
        pool = cfg.pool
        levels = len(pool.levels) if pool.levels else len(plan.level_channels)
        groups = len(pool.t_star) if pool.group_by_t_star else 1
        per_slot = pool.heads_per_slot if pool.dynamic else 1
        slots = len(pool.tasks) * groups * levels
        lines.append(f"heads: {slots * per_slot:,} in the pool ({len(pool.tasks)} tasks x {groups} t* groups x "
                     f"{levels} levels x {per_slot}), {slots:,} active per step")
        lines.append(f"student: {cfg.student.kind}, {plan.trainable:,} trainable parameters; mixed precision "
                     f"{cfg.mixed_precision} on {device.type}")
        lines.append(f"memory: {_device_line(plan.peak_bytes)}")
    lines.append(f"output: {check_out_folder(out, resume)}" if command == "distill" else
                 f"cache: {out or 'the shared cache ($NITROFUSION_CACHE)'}")
    print(f"dry run of `{command}`: every check passed; nothing was written")
    print("\n".join(f"  {line}" for line in lines))
