"""Worlds (model families): one object per family covers everything a run and its models need, and a registry
picks it from the run's config (`world:`) or from the model a command is given, never by a string test in a
command.

A world answers, for training: its model adapter (prompts -> conditioning, teacher sampling, the student call
and its one-step x0, the backbone's features: method/adapter.py) and its prompt source; for inference: whether a
model path is one of its models, 1-4 step generation into a folder or for the live app, and its default
evaluation. Registered here: `mini` (the embedded Fashion-MNIST world), `sdxl`, `sd` (Stable Diffusion
1.x/2.x) and `sd3` (SD3/3.5, a DiT trained as a flow).
"""

from __future__ import annotations

# Lazy (PEP 562): the torch-free configs import `worlds.sdxl.config` and `worlds.mini.config`, which must not load
# torch through this package.
_EXPORTS = {"GenerateOptions": "base", "LiveGenerator": "base", "World": "base", "register": "registry",
            "registered": "registry", "world_named": "registry", "world_of_config": "registry",
            "world_of_model": "registry"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
