"""Multi-step teacher samplers as pure functions: (predict, x_T, spec) -> x0.

`predict(x, t)` returns the teacher's model output (guidance already applied by the adapter).
A sampler spec names a diffusers scheduler, an explicit timestep grid with x0 re-noising (DMD2's 4-step
sampler, docs/method.md §1), or a nitrofusion student's own 1-4 step sampler (a few-step model as the teacher).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from ..errors import ConfigError
from ..method.diffusion import NoiseProcess
from .scheduler import config_for, shifted_scheduler
from .spec import ALIASES, SamplerSpec, _is_scheduler_class  # noqa: F401 - re-exported

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_grid(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced 'trailing' grid: 4 steps -> [999, 749, 499, 249] (DMD2's)."""
    return [int(num_train_timesteps - 1 - i * (num_train_timesteps // steps)) for i in range(steps)]


def _scheduler(spec: SamplerSpec, scheduler_config: dict):
    kw = {"timestep_spacing": spec.timestep_spacing}
    if _is_scheduler_class(spec.name):
        import diffusers

        cls = getattr(diffusers, spec.name)
        return cls.from_config(config_for(cls, scheduler_config), **kw)
    if spec.name == "ddim":
        return DDIMScheduler.from_config(config_for(DDIMScheduler, scheduler_config), **kw,
                                         set_alpha_to_one=False, clip_sample=False)
    if spec.name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config_for(DPMSolverMultistepScheduler, scheduler_config),
                                                       **kw, algorithm_type="dpmsolver++", solver_order=2,
                                                       final_sigmas_type="zero")
    if spec.name == "euler":
        return EulerDiscreteScheduler.from_config(config_for(EulerDiscreteScheduler, scheduler_config), **kw)
    raise ConfigError(f"unknown sampler '{spec.name}'")


@torch.no_grad()
def sample(predict: Predict, x_T: torch.Tensor, spec: SamplerSpec, scheduler_config: dict,
           process: NoiseProcess, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run the teacher from x_T to x0 with the sampler `spec`; `process` reads x0 and re-noises (x0-renoise)."""
    if spec.name == "x0-renoise":
        grid = spec.timesteps or default_grid(spec.steps, scheduler_config.get("num_train_timesteps", 1000))
        x = x_T
        x0 = x_T
        for i, t in enumerate(grid):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x0 = process.x0(predict(x, tt), x, tt)
            if i + 1 < len(grid):
                nxt = torch.full_like(tt, grid[i + 1])
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = process.add_noise(x0, noise, nxt)
        return x0
    if spec.name == "student":  # a few-step student as the teacher: its own loop (sampling/student.py generate)
        sched = shifted_scheduler(scheduler_config, spec.shift)
        sched.set_timesteps(spec.steps, device=x_T.device)
        x = x_T
        for t in sched.timesteps:
            x = sched.step(predict(x, t.expand(x.shape[0])).float(), t, x.float(), generator=generator).prev_sample
        return x
    sched = _scheduler(spec, scheduler_config)
    if spec.timesteps:
        sched.set_timesteps(device=x_T.device, timesteps=list(spec.timesteps))
    else:
        sched.set_timesteps(spec.steps, device=x_T.device)
    x = x_T * getattr(sched, "init_noise_sigma", 1.0)  # flow-matching schedulers start at sigma 1: no scaling
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = predict(inp, t.expand(x.shape[0]))
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x
