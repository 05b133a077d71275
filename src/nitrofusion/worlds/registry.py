"""The world registry: a world by name (a run's `world:`), or the world a model path belongs to."""

from __future__ import annotations

from pathlib import Path

from ..distill_config import DistillConfig
from ..errors import NitroFusionError
from .base import World

_WORLDS: dict[str, World] = {}


def register(world: World) -> World:
    _WORLDS[world.name] = world
    return world


def registered() -> dict[str, World]:
    if not _WORLDS:  # the built-in worlds, imported on first use (each imports its own model code lazily)
        from .flux.world import FluxWorld
        from .mini.world import MiniWorld
        from .sd.world import SDWorld
        from .sd3.world import SD3World
        from .sdxl.world import SDXLWorld

        register(MiniWorld())
        register(SDXLWorld())
        register(SDWorld())
        register(SD3World())
        register(FluxWorld())
    return _WORLDS


def world_named(name: str) -> World:
    worlds = registered()
    if name not in worlds:
        raise NitroFusionError(f"unknown world {name!r}: choose {', '.join(worlds)}")
    return worlds[name]


def world_of_config(cfg: DistillConfig) -> World:
    return world_named(cfg.world)


def world_of_model(model: str | Path, flag: str = "--model") -> World:
    """The world of a run folder (its config.yaml says), a student/UNet folder, an exported pipeline or a
    weights file, or of a Hugging Face Hub id's snapshot of one (`flag` names the option in messages); 'teacher' is
    the mini world's shipped teacher. A path that is none of these is one line."""
    if str(model) == "teacher":
        return world_named("mini")
    from .pipelines.hub import local_model
    from .pipelines.pipeline import model_kind, run_config

    path = local_model(model, flag)
    kind = model_kind(path)
    if kind == "run":
        return world_named(run_config(path).get("world", "mini"))
    for world in registered().values():
        if world.recognises(kind, path):
            return world
    raise NitroFusionError(f"{path} is a {kind} of no registered world ({', '.join(registered())})")
