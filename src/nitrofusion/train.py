"""The distillation loop on accelerate: teacher pairs in, a 1-4 step student out.

One optimiser step = sample the active heads, run `grad_accum` micro-batches of the adversarial step
(the same heads throughout), step both optimisers, refresh ~1% of the pool. Durations are counted in
images. Checkpoints hold student, EMA, pool, both optimisers, RNG and data position, so `resume`
continues exactly where the last complete checkpoint left off.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import config as config_lib
from . import faults, threads
from . import student as student_lib
from .adapters.base import ModelAdapter, cond_to
from .distill_config import DistillConfig
from .dtypes import mixed_precision_dtype
from .errors import NitroFusionError, describe
from .io import atomic_write_text, disk_errors
from .method.backbone import UNetBackbone
from .method.pool import HeadPool
from .method.step import AdversarialStep
from .pair_cache import use_cpu
from .pairs import MixedPairs, OnlinePairs, Pairs, ShardedPairs, make_loader
from .sampling import shifted_scheduler
from .unet_weights import load_checked

Evaluator = Callable[[torch.nn.Module, int], dict]


def read_student_init(cfg: DistillConfig, header_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The student_init weights (None for 'teacher'); a missing or unreadable file, or a file of the other
    student kind (a UNet for a LoRA student, LoRA factors for a full one), is a one-line error. `header_only`
    reads just the safetensors header: the CLI's check before any teacher pair is generated."""
    if cfg.student_init == "teacher":
        return None
    path = Path(cfg.student_init)
    if not path.is_file():
        raise NitroFusionError(f"student_init file not found: {path}; give a .safetensors UNet or 'teacher'")
    student_lib.check_init_kind(path, cfg.student.kind)
    if header_only:
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file surfaces as several types
        raise NitroFusionError(f"student_init {path} is not a readable safetensors file ({describe(e)}); give a "
                               "UNet .safetensors or 'teacher'") from None


def check_student(cfg: DistillConfig, adapter: ModelAdapter) -> None:
    """What can be checked once the teacher UNet exists, before minutes of teacher sampling: the init file's
    kind and the LoRA target names."""
    read_student_init(cfg, header_only=True)
    if cfg.student.kind == "lora":
        student_lib.check_targets(adapter.teacher_unet, cfg.student.targets)


def build_student(cfg: DistillConfig, adapter: ModelAdapter, device: torch.device | str = "cpu",
                  weight_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The student on `device`, the frozen teacher/backbone/encoders moved there in `weight_dtype`.
    full: the teacher's architecture, fp32 master weights copied before the teacher is cast (docs/method.md §1, §4).
    lora: the teacher UNet itself, cast, with fp32 adapters added (docs/method.md §7): no second UNet."""
    state = read_student_init(cfg)
    if cfg.student.kind == "lora":
        adapter.to(device, weight_dtype)
        s = cfg.student
        student = adapter.teacher_unet
        student_lib.add_lora(student, s.rank, s.alpha, s.dropout, s.targets)
        student.to(device)
        if state is not None:
            student_lib.load_init_factors(student, state, Path(cfg.student_init))
    else:
        student = copy.deepcopy(adapter.teacher_unet).float()
        if state is not None:
            load_checked(student, state, f"student_init {cfg.student_init}", "the teacher UNet")
        student.requires_grad_(True)
        student.to(device)
        adapter.to(device, weight_dtype)
    student.train()
    if cfg.gradient_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    return student


def _adamw(params, o, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW); `sharded`: ZeRO stage 1, each rank keeps the optimiser state of
    its share of the parameters (torch's ZeroRedundancyOptimizer) and broadcasts its updated share."""
    cls = torch.optim.AdamW
    if o.kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise NitroFusionError("optimiser kind 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                                   "(GPU), or set kind=adamw") from None
        cls = bnb.optim.AdamW8bit
    kw = {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay}
    if sharded:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(list(params), optimizer_class=cls, **kw)
    return cls(params, **kw)




class _EMA:
    """EMA of the trainable weights (a LoRA student: its adapters only), in fp32."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in student_lib.trainable_state(module).items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in student_lib.trainable_state(module).items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1 - self.decay)


def average_active_head_grads(acc: Accelerator, pool: HeadPool, active: torch.Tensor) -> None:
    """The pool is not DDP-wrapped: average the active heads' gradients over ranks in one collective.
    Every rank sends the same parameter list (a head its micro-batch did not reach sends zeros), so the
    collectives line up even when a rank had no sample at some t*."""
    params = [p for i in pool.active_indices(active) for p in pool.heads[i].parameters()]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = acc.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="mean")
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


LORA_DIR = "lora"  # run_dir/student/lora: a LoRA student's trained adapters


def save_student(run_dir: Path, student: torch.nn.Module, adapter: ModelAdapter, shift: int,
                 lora: tuple[dict[str, torch.Tensor], dict] | None = None) -> Path:
    """run_dir/student: a diffusers UNet folder (a LoRA student's merged into its base) plus the shifted LCM
    scheduler it must be sampled with; for a LoRA student also lora/ with the adapters themselves
    (PEFT factors + LoraConfig metadata, and a kohya file), which `export --format lora` hands on exactly."""
    out = run_dir / "student"
    student.save_pretrained(out / "unet", safe_serialization=True)
    faults.point("student-save")  # the UNet written, its scheduler not yet
    shifted_scheduler(adapter.scheduler_config, shift).save_pretrained(out / "scheduler")
    if lora is not None:
        from .export import save_lora_files

        factors, metadata = lora
        (out / LORA_DIR).mkdir(exist_ok=True)
        save_lora_files(out / LORA_DIR, factors, student.config, int(metadata["r"]), shift,
                        alpha=float(metadata["lora_alpha"]), metadata=metadata)
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


def distill(cfg: DistillConfig, adapter: ModelAdapter, pairs: Pairs | ShardedPairs | OnlinePairs | MixedPairs,
            run_dir: str | Path,
            resume: bool = False, evaluator: Evaluator | None = None, progress: bool = True) -> dict:
    """Train a student; returns its summary with the final (EMA, merged) student. A LoRA student lives on the
    adapter's teacher UNet: its adapters are removed on the way out, so the adapter serves the next run as the
    plain teacher (ablate trains many runs on one adapter)."""
    try:
        return _distill(cfg, adapter, pairs, Path(run_dir), resume, evaluator, progress)
    finally:
        if student_lib.has_lora(adapter.teacher_unet):
            student_lib.remove_lora(adapter.teacher_unet)


def _distill(cfg: DistillConfig, adapter: ModelAdapter, pairs, run_dir: Path, resume: bool,
             evaluator: Evaluator | None, progress: bool) -> dict:
    if not resume and ckpt.latest(run_dir) is not None:
        raise NitroFusionError(f"{run_dir} already holds a run (checkpoints/); add --resume to continue it or "
                               "choose a new --out")
    ensure_writable(run_dir)
    threads.apply(cfg.threads)  # 0: the automatic rule (threads.py)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=use_cpu())
    device = acc.device
    torch.manual_seed(cfg.seed)
    # frozen teacher/backbone/encoders in the autocast dtype; the student keeps fp32 master weights
    student = build_student(cfg, adapter, device, mixed_precision_dtype(cfg.mixed_precision))
    if acc.is_main_process:  # the fully resolved config, once the student's weights have loaded
        config_lib.save(cfg, run_dir / "config.yaml")
    backbone = UNetBackbone(adapter.teacher_unet, cfg.gradient_checkpointing)
    pool = HeadPool(cfg.pool, backbone.channels).to(device)
    zero = cfg.student_optim.zero and acc.num_processes > 1
    opt_g = _adamw([p for p in student.parameters() if p.requires_grad], cfg.student_optim, sharded=zero)
    opt_d = _adamw(pool.parameters(), cfg.heads_optim)
    student = acc.prepare(student)
    if not zero:  # accelerate's optimiser wrapper reads state_dict() at once, which ZeRO only has after consolidating
        opt_g = acc.prepare(opt_g)
    ema = _EMA(acc.unwrap_model(student), cfg.ema_decay) if cfg.ema_decay > 0 else None
    step_fn = AdversarialStep(adapter, student, backbone, pool, cfg.adversarial, cfg.multistep)
    loader = make_loader(pairs, cfg.micro_batch, cfg.seed, acc.process_index, acc.num_processes, device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)  # t*, noise, crops
    images_per_step = cfg.micro_batch * cfg.grad_accum * acc.num_processes

    step, images, train_seconds, bad_streak = 0, 0, 0.0, 0
    log_path = run_dir / "log.jsonl"
    found = ckpt.load_newest_readable(run_dir, log=print if acc.is_main_process else lambda _: None) \
        if resume else None
    last = found[0] if found else None
    last_saved = -1
    if resume and last is None and acc.is_main_process:
        print(f"no checkpoint in {run_dir / 'checkpoints'}; starting from scratch")
    if last is None:
        if acc.is_main_process:
            log_path.unlink(missing_ok=True)
    else:
        tensors, optim, state = found[1]
        saved_processes = sum(k.startswith("trainer.") for k in tensors["rng"])
        if saved_processes != acc.num_processes:  # data order, RNG streams and ZeRO shards are per process
            raise NitroFusionError(f"{last} was written by {saved_processes} process(es), this run has "
                                   f"{acc.num_processes}; resume with the same number (accelerate launch "
                                   f"--num_processes {saved_processes}) or start a new --out")
        student_lib.load_trainable_state(acc.unwrap_model(student), tensors["student"])
        pool.set_generator_state(tensors["pool"].pop("__generator__"))
        pool.load_state_dict(tensors["pool"])
        if ema is not None and "ema" in tensors:
            ema.shadow = {k: v.float() for k, v in tensors["ema"].items()}
        opt_g.load_state_dict(optim["g"])
        opt_d.load_state_dict(optim["d"])
        gen.set_state(tensors["rng"][f"trainer.{acc.process_index}"])  # each rank continues its own streams
        torch.set_rng_state(tensors["rng"][f"torch.{acc.process_index}"])
        loader.load_state(state["loader"])
        step, images, train_seconds = state["step"], state["images"], state["train_seconds"]
        last_saved = step
        if acc.is_main_process and log_path.exists():  # drop entries logged after that checkpoint
            kept = [ln for ln in log_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
            atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))

    def budget_left() -> bool:
        return not ((cfg.max_images and images >= cfg.max_images)
                    or (cfg.max_minutes and train_seconds >= cfg.max_minutes * 60))

    def save_checkpoint() -> None:
        if zero:  # a collective: every rank sends its optimiser shard to rank 0
            getattr(opt_g, "optimizer", opt_g).consolidate_state_dict(to=0)
        nonlocal last_saved
        last_saved = step
        # every rank's RNG streams (t*, crops, noise), gathered: a resume with the same number of processes is exact
        rng = torch.stack([gen.get_state(), torch.get_rng_state()]).to(device)
        rng = acc.gather(rng).cpu() if acc.num_processes > 1 else rng.cpu()
        if not acc.is_main_process:
            return
        pool_sd = dict(pool.state_dict())
        pool_sd["__generator__"] = pool.generator_state()
        rngs = {f"{kind}.{r}": rng[2 * r + i] for r in range(acc.num_processes)
                for i, kind in enumerate(("trainer", "torch"))}
        tensors = {"student": student_lib.trainable_state(acc.unwrap_model(student)), "pool": pool_sd, "rng": rngs}
        if ema is not None:
            tensors["ema"] = ema.shadow
        state = {"step": step, "images": images, "train_seconds": train_seconds, "loader": loader.state()}
        with disk_errors("a checkpoint", run_dir / "checkpoints"):
            ckpt.save(run_dir, step, tensors, {"g": opt_g.state_dict(), "d": opt_d.state_dict()}, state,
                      cfg.keep_checkpoints)

    def eval_student() -> torch.nn.Module:
        """A plain UNet for evaluation and saving: the EMA weights when kept, a LoRA student merged."""
        return student_lib.merged(acc.unwrap_model(student), ema.shadow if ema is not None else None)

    def evaluate() -> None:
        if evaluator is None or not acc.is_main_process:
            return
        model = eval_student().eval()
        result = evaluator(model, step)
        model.train()
        entry = {"step": step, "images": images, "train_seconds": round(train_seconds, 2), "eval": result}
        with disk_errors("the training log", log_path), open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    total = cfg.max_images or None
    bar = tqdm(total=total, initial=min(images, total or images), unit="img", desc="distill",
               disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    if step == 0 and cfg.eval_every:
        evaluate()
    while budget_left():
        t0 = time.time()
        active = pool.sample_active()  # fixed for all micro-batches of this optimiser step
        refine_p = cfg.multistep.p if images >= cfg.multistep.start_images else 0.0
        sums: dict[str, float] = {}
        nonfinite: set[tuple[str, int]] = set()
        for micro in range(cfg.grad_accum):
            x_T, x0, prompts = loader.next()
            cond = cond_to(adapter.encode_prompts(prompts), device)
            sync = micro == cfg.grad_accum - 1
            ctx = acc.no_sync(student) if not sync else _nullcontext()
            with ctx, acc.autocast():
                logs = step_fn(x_T.to(device), x0.to(device), cond, active, gen, loss_scale=1.0 / cfg.grad_accum,
                               refine_p=refine_p)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            nonfinite.update(step_fn.nonfinite)
        finite = all(math.isfinite(v) for v in sums.values())
        if finite and cfg.max_grad_norm == 0:  # a non-finite gradient with finite losses also skips the step
            grads = [p.grad for p in student.parameters() if p.grad is not None]
            finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if acc.num_processes > 1:  # every rank must agree to skip, or the replicas drift apart
            flag = torch.tensor([0.0 if finite else 1.0], device=device)
            finite = bool(acc.reduce(flag, reduction="sum").item() == 0)
        if acc.num_processes > 1:
            average_active_head_grads(acc, pool, active)
        if finite and cfg.max_grad_norm:
            norm = acc.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            finite = bool(torch.isfinite(torch.as_tensor(norm)))
        if finite:
            opt_g.step()
            opt_d.step()
            bad_streak = 0
        else:
            bad_streak += 1
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        refreshed = pool.refresh(opt_d)
        if ema is not None and finite:
            ema.update(acc.unwrap_model(student))
        step += 1
        images += images_per_step
        dt = time.time() - t0
        train_seconds += dt
        bar.update(images_per_step)
        bar.set_postfix(g=f"{sums.get('loss_g', 0):.3f}", d=f"{sums.get('loss_d', 0):.3f}",
                        img_s=f"{images_per_step / dt:.1f}")
        if acc.is_main_process and step % cfg.log_every == 0:
            entry = {"step": step, "images": images, "train_seconds": round(train_seconds, 2),
                     "images_per_second": round(images_per_step / dt, 2), "skipped": not finite,
                     "refreshed": len(refreshed), **{k: round(v, 5) for k, v in sums.items()}}
            if not finite:  # which task and t* went wrong (docs/method.md §3: grouped by t*, so this localises it)
                entry["nonfinite"] = [f"{task}@t*={ts}" for task, ts in sorted(nonfinite)] or ["gradient"]
            with disk_errors("the training log", log_path), open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if not finite and bad_streak >= 10:
            save_checkpoint()
            where = ", ".join(f"{task}@t*={ts}" for task, ts in sorted(nonfinite)) or "gradients"
            raise NitroFusionError(f"{bad_streak} optimiser steps in a row had a non-finite loss or gradient "
                                   f"(last: {where}); lower the learning rates; the last good state is in "
                                   f"{run_dir / 'checkpoints'}")
        if step % cfg.checkpoint_every == 0:
            save_checkpoint()
        if cfg.eval_every and step % cfg.eval_every == 0:
            evaluate()
    bar.close()
    if last_saved != step:  # decided from the step alone: every rank must agree (the save may be a collective)
        save_checkpoint()
    acc.wait_for_everyone()
    final = eval_student().eval()
    if acc.is_main_process:
        model = acc.unwrap_model(student)
        lora = None
        if cfg.student.kind == "lora":
            lora = (student_lib.peft_factors(model, ema.shadow if ema is not None else None),
                    student_lib.lora_metadata(model))
        with disk_errors("the student", run_dir / "student"):
            save_student(run_dir, final, adapter, cfg.adversarial.shift, lora)
        if cfg.eval_every and (step % cfg.eval_every):
            evaluate()
    return {"iterations": step, "images": images, "seconds": round(train_seconds, 1), "student": final,
            "pool": pool, "run_dir": str(run_dir)}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
