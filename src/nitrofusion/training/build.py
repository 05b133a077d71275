"""A run's parts, built once: the student (a full copy of the teacher UNet in fp32 master weights, or LoRA adapters
on the teacher itself: docs/method.md §1, §4, §7, optionally initialised from a file, `student_init`), E, the head
pool, the optimisers, the EMA and the adversarial step, as one `TrainParts` bundle."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ..distill_config import DistillConfig
from ..dtypes import mixed_precision_dtype
from ..method.adapter import ModelAdapter
from ..method.guidance import GUIDANCE_PROJECTION, add_guidance_input
from ..method.pool import HeadPool
from ..method.step import AdversarialStep
from ..models import student as student_lib
from ..models.student import read_student_init
from ..models.weights import load_checked
from .optim import EMA, adamw


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
        if cfg.student.guidance:  # w as conditioning, its projection at zero: still the same function (§10)
            student = add_guidance_input(student)
        student.requires_grad_(True)
        student.to(device)
        adapter.to(device, weight_dtype)
    student.train()
    if cfg.gradient_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    return student


def student_param_groups(student: torch.nn.Module, cfg: DistillConfig) -> list[dict]:
    """The student's trainable weights; a guided student's guidance projection as a group of its own, at
    student.guidance_lr_scale x the lr (it starts at zero and is the only way w reaches the UNet, §10)."""
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    projection = [p for n, p in named if n.endswith(GUIDANCE_PROJECTION)] if cfg.student.guidance else []
    rest = [p for _, p in named if not any(p is q for q in projection)]
    return [{"params": rest}] + ([{"params": projection, "lr_scale": cfg.student.guidance_lr_scale}]
                                 if projection else [])


@dataclass
class TrainParts:
    """Everything one optimiser step touches, built once (`build_parts`): the student (DDP-wrapped in a run of
    several processes), E, the head pool, both optimisers, the EMA and the adversarial step over them."""

    acc: Accelerator
    student: torch.nn.Module
    backbone: torch.nn.Module
    pool: HeadPool
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EMA | None
    step_fn: AdversarialStep
    zero: bool  # the student's optimiser state is sharded over the processes (ZeRO-1)
    fsdp: bool = False  # the student itself is sharded over the processes (FSDP2: training/fsdp.py)


def build_parts(cfg: DistillConfig, adapter: ModelAdapter, acc: Accelerator,
                on_student: Callable[[], None] | None = None) -> TrainParts:
    """A run's parts on `acc`'s device, the frozen teacher/backbone/encoders in the autocast dtype and the student in
    fp32 master weights; `on_student` runs once the student's weights have loaded (the run saves its config then).
    Seeded by the caller (torch.manual_seed): the order of the random initialisations here is part of the run."""
    student = build_student(cfg, adapter, acc.device, mixed_precision_dtype(cfg.mixed_precision))
    if on_student is not None:
        on_student()
    backbone = adapter.make_backbone(cfg.gradient_checkpointing)
    pool = HeadPool(cfg.pool, backbone.channels, guided=bool(cfg.student.guidance)).to(acc.device)
    zero = cfg.student_optim.zero and acc.num_processes > 1
    if cfg.fsdp:  # sharded in place before its optimiser is built on the sharded parameters (training/fsdp.py)
        from .fsdp import check_processes, shard_student

        check_processes(acc.num_processes)
        shard_student(student, cfg.mixed_precision)
    opt_g = adamw(student_param_groups(student, cfg), cfg.student_optim, sharded=zero)
    opt_d = adamw(pool.parameters(), cfg.heads_optim)
    if not cfg.fsdp:
        student = acc.prepare(student)
        if not zero:  # accelerate's optimiser wrapper reads state_dict() at once, which ZeRO has after consolidating
            opt_g = acc.prepare(opt_g)
    ema = EMA(acc.unwrap_model(student), cfg.ema_decay) if cfg.ema_decay > 0 else None
    step_fn = AdversarialStep(adapter, student, backbone, pool, cfg.adversarial, cfg.multistep)
    if cfg.fsdp:
        from .fsdp import deepest_of_all_ranks

        step_fn.agree_depth = deepest_of_all_ranks
    return TrainParts(acc, student, backbone, pool, opt_g, opt_d, ema, step_fn, zero, cfg.fsdp)


def single_process_parts(cfg: DistillConfig, adapter: ModelAdapter, device: torch.device) -> TrainParts:
    """The parts outside a run (`bench`, the step profile): one process on `device`."""
    return build_parts(cfg, adapter, Accelerator(mixed_precision=cfg.mixed_precision, cpu=device.type == "cpu"))
