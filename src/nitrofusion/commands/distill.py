"""`nitrofusion distill`: train a student (one process or `accelerate launch`)."""

from __future__ import annotations

from pathlib import Path

from .common import model_args, resumed_config
from .dry_run import check_out_folder


def cmd_distill(args) -> None:
    cfg = resumed_config(args, model_args(args))  # checked before torch and diffusers load (seconds)
    if args.dry_run:
        from .dry_run import dry_run

        return dry_run(cfg, Path(args.out), args.resume, "distill")
    check_out_folder(Path(args.out), args.resume)  # an existing run, a file in the path: before anything loads
    from ..worlds import world_of_config

    world = world_of_config(cfg)
    world.check_teacher(cfg)  # a wrong teacher folder or an offline hub id: before --out and the training stack
    from ..data.pair_cache import process_state, training_data
    from ..data.real_data import training_source
    from ..dtypes import check_mixed_precision
    from ..training import check_student, distill, ensure_writable, read_student_init

    state = process_state()
    if cfg.fsdp:  # before any weights load
        from ..training.fsdp import check_processes

        check_processes(state.num_processes)
    check_mixed_precision(cfg.mixed_precision, state.device)
    read_student_init(cfg, header_only=True)
    ensure_writable(Path(args.out))  # before minutes of teacher sampling, not after
    prompts = world.prompts(cfg, verbose=state.is_main_process)  # a bad source fails before a model loads
    adapter = world.adapter(cfg)
    check_student(cfg, adapter)  # LoRA targets against the real UNet, still before any teacher pair
    data = training_source(cfg, lambda: training_data(cfg, adapter, prompts, state),
                           lambda: world.real_pairs(cfg, adapter, progress=state.is_main_process))
    if cfg.real.source == "teacher" and not cfg.pairs.online:  # every prompt the run encodes is a cached pair's
        freed = adapter.release_cached_encoders()
        if freed and state.is_main_process:
            print(f"text encoder released: {freed / 2**20:,.0f} MiB of weights no longer resident (its states come "
                  "from the teacher-pair cache)")
    evaluator = world.training_evaluator(cfg, adapter) if state.is_main_process else None
    result = distill(cfg, adapter, data, Path(args.out), resume=args.resume, evaluator=evaluator)
    if state.is_main_process:
        print(f"student written to {Path(args.out) / 'student'}: {result['iterations']} steps, "
              f"{result['images']} images, {result['seconds']:.0f} s")

