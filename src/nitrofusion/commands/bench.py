"""`nitrofusion bench`: training step, memory model and inference timings, from the world the size names."""

from __future__ import annotations

WORLD_OF_SIZE = {"mini": "mini", "tiny": "sdxl", "full": "sdxl"}  # --size: the mini world's step, or SDXL's


def cmd_bench(args) -> None:
    from ..io import atomic_write_json
    from ..worlds import world_named

    result, text = world_named(WORLD_OF_SIZE[args.size]).bench(vars(args))
    print(text)
    if args.out:
        atomic_write_json(args.out, result)
        print(f"results: {args.out}")
