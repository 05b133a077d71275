"""1-4 step generation with one set of student weights through TimestepShiftLCMScheduler (SPEC section 5)."""

from __future__ import annotations

import torch

from .adapters.base import Cond, ModelAdapter
from .errors import NitroFusionError
from .schedulers import TimestepShiftLCMScheduler, config_for


def shifted_scheduler(scheduler_config: dict, shift: int) -> TimestepShiftLCMScheduler:
    cfg = {**config_for(TimestepShiftLCMScheduler, scheduler_config), "shifted_timestep": shift,
           "original_inference_steps": 4}
    return TimestepShiftLCMScheduler.from_config(cfg)


@torch.no_grad()
def generate(adapter: ModelAdapter, unet: torch.nn.Module, x_T: torch.Tensor, cond: Cond, steps: int,
             shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """x0 after `steps` (1-4) shifted-LCM steps from x_T; `generator` draws the re-noising noise."""
    if not 1 <= steps <= 4:
        raise NitroFusionError(f"steps must be 1, 2, 3 or 4 (got {steps}): the shifted LCM grid has 4 points")
    sched = shifted_scheduler(adapter.scheduler_config, shift)
    sched.set_timesteps(steps, device=x_T.device)
    x = x_T
    for t in sched.timesteps:
        out = adapter.unet_call(unet, x, t.expand(x.shape[0]), cond)
        x = sched.step(out.float(), t, x.float(), generator=generator).prev_sample
    return x
