"""A teacher sampler named in a config (SamplerSpec); torch-free, so configs check fast (teacher.py runs it)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from ..config import ranged
from ..errors import ConfigError, NitroFusionError


@dataclass
class SamplerSpec:
    # ddim / dpmsolver++ / euler: a diffusers scheduler with the settings below; any diffusers scheduler
    # class name (e.g. "LCMScheduler"); x0-renoise: x0 at each of `timesteps`, re-noised with fresh noise
    # to the next (DMD2's 4-step sampler, docs/method.md §1); student: a nitrofusion student's own 1-4 step
    # shifted-LCM sampler (a few-step model as the teacher, as DMD2's UNet is in sdxl-realism; docs/method.md §1)
    name: str = "dpmsolver++"
    steps: int = ranged(8, ge=1, le=1000)
    guidance_scale: float = ranged(2.0, ge=0, le=100)
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "trailing"
    timesteps: list[int] = ranged(factory=list, ge=0, le=999)  # explicit grid (x0-renoise, or a scheduler taking one)
    shift: int = ranged(1000, ge=1, le=1000)  # student: the shifted timestep it was trained with (docs/method.md §2.3)
    # [w_min, w_max]: each pair's guidance scale is drawn from this range (stored with the pair) instead of
    # guidance_scale; set from student.guidance by the run, not in a preset's sampler (docs/method.md §10)
    guidance_range: list[float] = ranged(factory=list, gt=0, le=100)

    def __repr__(self) -> str:
        # the pair cache keys on this text (data/pairs.py cache_key): `shift` and `guidance_range` appear only
        # where they matter, so every key made before they existed still finds its pairs
        names = [f.name for f in fields(self) if (f.name != "shift" or self.name == "student")
                 and (f.name != "guidance_range" or self.guidance_range)]
        return f"SamplerSpec({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    def validate(self) -> None:
        if self.name not in (*ALIASES, *OWN) and not _is_scheduler_class(self.name):
            raise ConfigError(f"unknown sampler '{self.name}': use one of {', '.join([*ALIASES, *OWN])} "
                              "or a diffusers scheduler class name such as 'DDIMScheduler'")
        if self.timesteps and len(self.timesteps) != self.steps:
            raise ConfigError("sampler.timesteps must have sampler.steps entries")
        if self.name == "student" and (self.steps > 4 or self.guidance_scale > 1 or self.timesteps):
            raise ConfigError("sampler student: 1-4 steps on the student's own grid (no sampler.timesteps) and no "
                              "classifier-free guidance (sampler.guidance_scale 0): the student was distilled without")

    def describe(self) -> str:
        g = f", CFG {self.guidance_scale:g}" if self.guidance_scale > 1 else ""
        if self.guidance_range:
            g = f", CFG w ~ U[{self.guidance_range[0]:g}, {self.guidance_range[1]:g}] per pair"
        if self.name == "student":
            return f"student sampler {self.steps} steps (shift {self.shift})"
        return f"{self.name} {self.steps} steps{g}"


ALIASES = ("ddim", "dpmsolver++", "euler")
OWN = ("x0-renoise", "student")  # samplers of our own (sampling/teacher.py)


def _is_scheduler_class(name: str) -> bool:
    import diffusers

    return name.endswith("Scheduler") and isinstance(getattr(diffusers, name, None), type)


def check_steps(steps: int) -> None:
    """1-4: the student's shifted LCM grid has 4 points (docs/method.md §5); every generating command checks
    this before any model loads."""
    if not 1 <= steps <= 4:
        raise NitroFusionError(f"steps must be 1, 2, 3 or 4 (got {steps}): the shifted LCM grid has 4 points")


def check_step_counts(steps: list[int], flag: str = "--steps") -> None:
    """A list of step counts (evaluate, ablate): each 1-4, checked before any model loads."""
    if not steps or any(not 1 <= s <= 4 for s in steps):
        raise NitroFusionError(f"{flag} takes values from 1 to 4 (got {steps}): the shifted LCM grid has 4 points")


MAX_SEED = 2**63 - 2**32  # torch generators take seeds < 2**64; image i of a batch is seeded seed + i


def check_seed(seed: int, name: str = "seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise NitroFusionError(f"{name} must be in [0, 2**63 - 2**32] (got {seed})")


def check_guidance(w: float | None) -> None:
    """`--guidance W`: a guidance scale in (0, 100], checked before any model loads."""
    if w is not None and not 0 < w <= 100:  # NaN fails too
        raise NitroFusionError(f"--guidance must be in (0, 100] (got {w:g}); 1 is no guidance, 2-8 the usual range")


def check_generate_values(height: int | None, width: int | None, batch_size: int, num_per_prompt: int) -> None:
    """Image sizes and batch sizes of a generating command, before any model loads."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % 8):
            raise NitroFusionError(f"--{name} must be a positive multiple of 8 (got {value})")
    if batch_size < 1:
        raise NitroFusionError(f"--batch-size must be >= 1 (got {batch_size})")
    if num_per_prompt < 1:
        raise NitroFusionError(f"--num-per-prompt must be >= 1 (got {num_per_prompt})")


def check_shift(shift: int | None) -> None:
    """--shift, the student's timestep shift (docs/method.md §5): t' = floor(t S / 1000) needs S in 1..1000."""
    if shift is not None and not 1 <= shift <= 1000:
        raise NitroFusionError(f"--shift must be in 1..1000 (got {shift}): NitroSD-Realism uses 250, -Vibrant 500, "
                               "a run of ours the adversarial.shift it was distilled with")
