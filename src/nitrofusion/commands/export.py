"""`nitrofusion export` / `transfer`: diffusers, single-file and LoRA outputs, by the model's world."""

from __future__ import annotations


def cmd_export(args) -> None:
    from ..worlds import world_of_model

    for line in world_of_model(args.model, flag="").export(args.model, args.format, args.out, vars(args)):
        print(line)


def cmd_transfer(args) -> None:
    from ..worlds import world_of_model

    world = world_of_model(args.student, flag="--student")
    for line in world.transfer(args.student, args.base, args.custom, args.out, vars(args)):
        print(line)
