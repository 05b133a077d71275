"""`nitrofusion evaluate`: a model's world's default evaluation at 1-4 steps."""

from __future__ import annotations

from pathlib import Path

from ..errors import NitroFusionError
from .common import output_folder


def cmd_evaluate(args) -> None:
    from ..sampling.spec import check_guidance  # torch-free

    check_guidance(args.guidance)
    output_folder(args.out)
    from ..worlds.pipelines.hub import is_hub_id  # torch-free: a wrong path answers before anything loads

    if args.model != "teacher" and not Path(args.model).exists() and not is_hub_id(args.model):
        raise NitroFusionError(f"--model {args.model} does not exist; give a run folder, an exported folder, a UNet "
                               "file, a Hugging Face Hub id or 'teacher'")
    from ..worlds import world_of_model

    world = world_of_model(args.model)
    if args.guidance is not None and world.name != "mini":
        raise NitroFusionError(f"--guidance applies to mini-world models (guided students, or the teacher); "
                               f"{args.model} is a {world.name}-world model: drop it")
    for line in world.evaluate(args.model, args.steps, Path(args.out), vars(args)):
        print(line)
    print(f"results: {Path(args.out) / 'results.md'}")

