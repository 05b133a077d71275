"""The distillation loop on accelerate: teacher pairs in, a 1-4 step student out.

One optimiser step (step.py) = sample the active heads, run `grad_accum` micro-batches of the adversarial
step (the same heads throughout), step both optimisers, refresh ~1% of the pool. Durations and intervals are
counted in images. Checkpoints hold the whole TrainState (state.py), so `resume` continues exactly where the
last complete checkpoint left off.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .. import config as config_lib
from .. import faults, preemption, threads
from ..data.pairs import EpochGrowth, GrowingPairs, MixedPairs, OnlinePairs, Pairs, ShardedPairs, make_loader
from ..distill_config import DistillConfig
from ..dtypes import use_cpu
from ..errors import NitroFusionError
from ..io import atomic_write_json, atomic_write_text, disk_errors, tensor_bytes
from ..method.adapter import ModelAdapter, cond_to
from ..method.guidance import GUIDANCE_FILE, default_scale, with_guidance
from ..models import student as student_lib
from ..models.student import LORA_DIR
from . import checkpoint as ckpt
from . import fsdp
from .build import TrainParts, build_parts
from .optim import set_learning_rates
from .state import TrainState
from .step import optimizer_step

Evaluator = Callable[[torch.nn.Module, int], dict]
Probe = Callable[[TrainParts, torch.nn.Module], dict]  # (the loop's parts, the evaluated student) -> numbers
PREEMPTED = "preempted.json"  # in the run folder while a run stopped by a signal waits for its --resume


def save_student(run_dir: Path, student: torch.nn.Module, adapter: ModelAdapter, shift: int,
                 lora: tuple[dict[str, torch.Tensor], dict] | None = None) -> Path:
    """run_dir/student: a diffusers UNet folder (a LoRA student's merged into its base) plus the shifted LCM
    scheduler it must be sampled with; for a LoRA student also lora/ with the adapters themselves
    (PEFT factors + LoraConfig metadata, and a kohya file), which `export --format lora` hands on exactly."""
    out = run_dir / "student"
    for stale in run_dir.glob(".student.*"):  # left by a writer that was killed or ran out of space
        shutil.rmtree(stale, ignore_errors=True)
    staged = run_dir / f".student.tmp-{os.getpid()}"  # written whole, then renamed: a reader never sees half
    try:
        student.save_pretrained(staged / adapter.student_subfolder, safe_serialization=True)
        faults.point("student-save")  # the UNet written, its scheduler not yet
        adapter.student_scheduler(shift).save_pretrained(staged / "scheduler")
        scale_range = adapter.sampler.guidance_range
        if scale_range:  # a guided student: the range it was trained on, and the w it samples at by default
            atomic_write_json(staged / GUIDANCE_FILE, {"range": scale_range, "default": default_scale(
                scale_range, adapter.sampler.guidance_scale)})
        if lora is not None:
            factors, metadata = lora
            (staged / LORA_DIR).mkdir(exist_ok=True)
            adapter.save_lora(staged / LORA_DIR, factors, student.config, int(metadata["r"]), shift,
                              float(metadata["lora_alpha"]), metadata)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if out.exists():  # a finished run saved again (--resume after the end): swap, then drop the old one
        old = run_dir / f".student.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, out)
    return out


def ensure_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # per process: ranks probe at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise NitroFusionError(f"cannot write to the run folder {run_dir} ({e.strerror}); choose another --out "
                               "or fix its permissions") from None


def stop_agreed(acc: Accelerator) -> bool:
    """Whether to stop for preemption now. A stop signal that any rank received counts for all (one all-reduce),
    so every rank checkpoints and leaves at the same step: SLURM signals every task, a launcher may not."""
    wanted = preemption.requested() is not None
    if acc.num_processes == 1:
        return wanted
    flag = torch.tensor([float(wanted)], device=acc.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def distill(cfg: DistillConfig, adapter: ModelAdapter,
            pairs: Pairs | ShardedPairs | GrowingPairs | OnlinePairs | MixedPairs,
            run_dir: str | Path,
            resume: bool = False, evaluator: Evaluator | None = None, progress: bool = True,
            probe: Probe | None = None) -> dict:
    """Train a student; returns its summary with the final (EMA, merged) student. A LoRA student lives on the
    adapter's teacher UNet: its adapters are removed on the way out, so the adapter serves the next run as the
    plain teacher (ablate trains many runs on one adapter)."""
    try:
        return _distill(cfg, adapter, pairs, Path(run_dir), resume, evaluator, progress, probe)
    finally:
        if student_lib.has_lora(adapter.teacher_unet):
            student_lib.remove_lora(adapter.teacher_unet)


def _distill(cfg: DistillConfig, adapter: ModelAdapter, pairs, run_dir: Path, resume: bool,
             evaluator: Evaluator | None, progress: bool, probe: Probe | None) -> dict:
    if not resume and ckpt.latest(run_dir) is not None:
        raise NitroFusionError(f"{run_dir} already holds a run (checkpoints/); add --resume to continue it or "
                               "choose a new --out")
    ensure_writable(run_dir)
    threads.apply(cfg.threads)  # 0: the automatic rule (threads.py)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=use_cpu())
    device = acc.device
    torch.manual_seed(cfg.seed)

    def save_config() -> None:  # the fully resolved config, once the student's weights have loaded
        if acc.is_main_process:
            config_lib.save(cfg, run_dir / "config.yaml")

    parts = build_parts(cfg, adapter, acc, on_student=save_config)
    student, pool, opt_g, ema = parts.student, parts.pool, parts.opt_g, parts.ema
    growth = EpochGrowth(cfg.pairs.start_shards, cfg.pairs.shard_size) if cfg.pairs.start_shards else None
    loader = make_loader(pairs, cfg.micro_batch, cfg.seed, acc.process_index, acc.num_processes, device, growth)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)  # t*, noise, crops
    images_per_step = cfg.micro_batch * cfg.grad_accum * acc.num_processes
    state = TrainState(parts, loader, gen)

    bad_streak = 0
    if acc.is_main_process:
        (run_dir / PREEMPTED).unlink(missing_ok=True)  # this start is the requeue the marker asked for
    log_path = run_dir / "log.jsonl"
    found = ckpt.load_newest_readable(run_dir, log=print if acc.is_main_process else lambda _: None) \
        if resume else None
    last_saved = -1
    if resume and found is None and acc.is_main_process:
        print(f"no checkpoint in {run_dir / 'checkpoints'}; starting from scratch")
    if found is None:
        if acc.is_main_process:
            log_path.unlink(missing_ok=True)
    else:
        state.load_state_dict(*found[1], source=str(found[0]))
        last_saved = state.step
        if acc.is_main_process and log_path.exists():  # drop entries logged after that checkpoint
            kept = [ln for ln in log_path.read_text().splitlines()
                    if json.loads(ln).get("step", 0) <= state.step]
            atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))

    def budget_left() -> bool:
        return not ((cfg.max_images and state.images >= cfg.max_images)
                    or (cfg.max_minutes and state.train_seconds >= cfg.max_minutes * 60))

    def save_checkpoint() -> None:
        nonlocal last_saved
        last_saved = state.step
        parts = state.state_dict()  # a collective: every rank takes part
        if parts is not None:
            with disk_errors("a checkpoint", run_dir / "checkpoints", needed=tensor_bytes(parts)):
                ckpt.save(run_dir, state.step, *parts, cfg.keep_checkpoints)

    def eval_student() -> torch.nn.Module:
        """A plain UNet for evaluation and saving: the EMA weights when kept, a LoRA student merged; an FSDP student
        gathered (a collective: every rank calls it)."""
        if parts.fsdp:
            return fsdp.plain_copy(student, {k: fsdp.full(v).cpu() for k, v in ema.shadow.items()} if ema else None)
        return student_lib.merged(acc.unwrap_model(student), ema.shadow if ema is not None else None)

    def log(entry: dict) -> None:
        with disk_errors("the training log", log_path), open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def evaluate() -> None:
        if evaluator is None and probe is None:
            return
        if parts.fsdp:  # the gather is a collective; the evaluation is the main process's
            model = eval_student().eval()
        if not acc.is_main_process:
            return
        if not parts.fsdp:
            model = eval_student().eval()
        entry = {"step": state.step, "images": state.images, "train_seconds": round(state.train_seconds, 2)}
        if evaluator is not None:
            entry["eval"] = evaluator(model, state.step)
        if probe is not None:  # read-only, its own generator: the run's numbers are the same without it
            entry["probe"] = probe(parts, model)
        model.train()
        log(entry)

    def crossed(every: int) -> bool:
        """An interval of `every` images ended within the step just taken (intervals count images, like the
        budget, so every machine and process count checkpoints and evaluations alike)."""
        return every > 0 and state.images // every > (state.images - images_per_step) // every

    def next_batch():
        x_T, x0, prompts, w = loader.next()
        return x_T.to(device), x0.to(device), cond_to(with_guidance(adapter.encode_prompts(prompts), w), device)

    total = cfg.max_images or None
    bar = tqdm(total=total, initial=min(state.images, total or state.images), unit="img", desc="distill",
               disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    evaluated_at = -1
    if state.step == 0 and cfg.eval_every_images:
        evaluate()
        evaluated_at = 0
    while budget_left():
        t0 = time.time()
        set_learning_rates([(opt_g, cfg.student_optim), (parts.opt_d, cfg.heads_optim)], state.images,
                           cfg.max_images)
        out = optimizer_step(parts, next_batch, gen, cfg.grad_accum, state.images, cfg.max_grad_norm)
        bad_streak = 0 if out.finite else bad_streak + 1
        state.step += 1
        state.images += images_per_step
        dt = time.time() - t0
        state.train_seconds += dt
        bar.update(images_per_step)
        shown = {"g": "loss_g", "d": "loss_d", "reg": "regression"}  # reg: only when the term is on
        bar.set_postfix({k: f"{out.logs[v]:.3f}" for k, v in shown.items() if v in out.logs},
                        img_s=f"{images_per_step / dt:.1f}")
        if acc.is_main_process and crossed(cfg.log_every_images):
            entry = {"step": state.step, "images": state.images, "train_seconds": round(state.train_seconds, 2),
                     "images_per_second": round(images_per_step / dt, 2), "skipped": not out.finite,
                     "lr": opt_g.param_groups[0]["lr"],
                     "refreshed": len(out.refreshed), **{k: round(v, 5) for k, v in out.logs.items()}}
            if device.type == "cuda":  # this process's peak since the run started (the memory model's lower bound)
                entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if not out.finite:  # which task and t* went wrong (docs/method.md §3: grouped by t*, so this localises it)
                entry["nonfinite"] = [f"{task}@t*={ts}" for task, ts in sorted(out.nonfinite)] or ["gradient"]
            log(entry)
        if not out.finite and bad_streak >= 10:
            save_checkpoint()
            where = ", ".join(f"{task}@t*={ts}" for task, ts in sorted(out.nonfinite)) or "gradients"
            raise NitroFusionError(f"{bad_streak} optimiser steps in a row had a non-finite loss or gradient "
                                   f"(last: {where}); lower the learning rates; the last good state is in "
                                   f"{run_dir / 'checkpoints'}")
        if crossed(cfg.checkpoint_every_images):
            save_checkpoint()
        if crossed(cfg.eval_every_images):
            evaluate()
            evaluated_at = state.step
        if budget_left() and stop_agreed(acc):  # a safe point: the step is whole, nothing half-done
            if last_saved != state.step:
                save_checkpoint()
            if acc.is_main_process:  # what a job script checks to requeue, whatever the launcher's exit status
                atomic_write_json(run_dir / PREEMPTED, {"signal": preemption.requested(), "step": state.step,
                                                        "images": state.images})
            acc.wait_for_everyone()
            bar.close()
            raise preemption.Preempted(
                f"stopped by {preemption.requested() or 'a signal to another process'} after step {state.step} "
                f"({state.images} images) with a checkpoint in {run_dir / 'checkpoints'}")
    bar.close()
    if last_saved != state.step:  # decided from the step alone: every rank must agree (the save may be a collective)
        save_checkpoint()
    acc.wait_for_everyone()
    final = eval_student().eval()
    if acc.is_main_process:
        model = acc.unwrap_model(student)
        lora = None
        if cfg.student.kind == "lora":
            lora = (student_lib.peft_factors(model, ema.shadow if ema is not None else None),
                    student_lib.lora_metadata(model))
        with disk_errors("the student", run_dir / "student", needed=tensor_bytes(final.state_dict())):
            save_student(run_dir, final, adapter, cfg.adversarial.shift, lora)
        if cfg.eval_every_images and evaluated_at != state.step:
            evaluate()
    return {"iterations": state.step, "images": state.images, "seconds": round(state.train_seconds, 1),
            "student": final, "pool": pool, "run_dir": str(run_dir)}
