"""A teacher sampler named in a config (SamplerSpec); torch-free, so configs check fast (teacher.py runs it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ranged
from ..errors import ConfigError


@dataclass
class SamplerSpec:
    # ddim / dpmsolver++ / euler: a diffusers scheduler with the settings below; any diffusers scheduler
    # class name (e.g. "LCMScheduler"); x0-renoise: x0 at each of `timesteps`, re-noised with fresh noise
    # to the next (DMD2's 4-step sampler, docs/method.md §1)
    name: str = "dpmsolver++"
    steps: int = ranged(8, ge=1, le=1000)
    guidance_scale: float = ranged(2.0, ge=0, le=100)
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    timesteps: list[int] = ranged(factory=list, ge=0, le=999)  # explicit grid (x0-renoise, or a scheduler taking one)

    def validate(self) -> None:
        if self.name not in ALIASES and self.name != "x0-renoise" and not _is_scheduler_class(self.name):
            raise ConfigError(f"unknown sampler '{self.name}': use one of {', '.join([*ALIASES, 'x0-renoise'])} "
                              "or a diffusers scheduler class name such as 'DDIMScheduler'")
        if self.timesteps and len(self.timesteps) != self.steps:
            raise ConfigError("sampler.timesteps must have sampler.steps entries")

    def describe(self) -> str:
        g = f", CFG {self.guidance_scale:g}" if self.guidance_scale > 1 else ""
        return f"{self.name} {self.steps} steps{g}"


ALIASES = ("ddim", "dpmsolver++", "euler")


def _is_scheduler_class(name: str) -> bool:
    import diffusers

    return name.endswith("Scheduler") and isinstance(getattr(diffusers, name, None), type)
