"""`nitrofusion bench`: training step, memory model and inference timings of a family (--family), or the mini world's
step (--size mini)."""

from __future__ import annotations


def cmd_bench(args) -> None:
    from ..io import atomic_write_json
    from ..worlds import world_named

    if args.fsdp and min(args.fsdp) < 2:
        from ..errors import NitroFusionError

        raise NitroFusionError(f"--fsdp {min(args.fsdp)}: FSDP shards over 2 or more GPUs; give counts >= 2, e.g. "
                               "--fsdp 2 4 8")
    world = "mini" if args.size == "mini" else args.family  # --size mini: the mini world's step
    result, text = world_named(world).bench(vars(args))
    print(text)
    if args.out:
        atomic_write_json(args.out, result)
        print(f"results: {args.out}")
