"""`nitrofusion pairs`: a run's teacher-pair cache, generated ahead of `distill`."""

from __future__ import annotations

from ..errors import NitroFusionError
from .common import distill_config, model_args


def cmd_pairs(args) -> None:
    extra = [f"pairs.dir={args.out}"] if args.out else []  # the folder `distill --set pairs.dir=...` reads
    cfg = distill_config(args, model_args(args) + extra)
    if args.dry_run:
        from pathlib import Path

        from .dry_run import dry_run

        return dry_run(cfg, Path(args.out) if args.out else None, False, "pairs")
    if cfg.pairs.online:
        raise NitroFusionError("pairs.online is set: this preset samples the teacher during training, nothing to "
                               "pre-generate (use --set pairs.online=false)")
    from ..worlds import world_of_config

    world = world_of_config(cfg)
    world.check_teacher(cfg)  # a wrong teacher folder or an offline hub id: before the training stack loads
    from ..data.pair_cache import process_state, shards_read, training_data
    from ..data.pairs import ShardSubset, load_pairs
    from ..dtypes import check_mixed_precision

    state = process_state()
    check_mixed_precision(cfg.mixed_precision, state.device)
    prompts = world.prompts(cfg, verbose=state.is_main_process)  # a bad source fails before a model loads
    out = training_data(cfg, world.adapter(cfg), prompts, state, load=False)
    if state.is_main_process:
        pairs = load_pairs(out, verify=False, in_memory=False,  # every shard was just checked or made
                           shards=shards_read(cfg, state.num_processes))
        print(f"{pairs.held if isinstance(pairs, ShardSubset) else len(pairs)} teacher pairs in {out}")

