"""1-4 step generation with one set of student weights through TimestepShiftLCMScheduler (docs/method.md §5)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from .scheduler import shifted_scheduler  # noqa: F401 - re-exported
from .spec import check_step_counts, check_steps  # noqa: F401 - re-exported: torch-free, in spec.py
from .teacher import SamplerSpec, sample

if TYPE_CHECKING:  # the adapter interface calls this module; its types are for annotations only
    from ..method.adapter import Cond, ModelAdapter


@torch.no_grad()
def generate(adapter: ModelAdapter, unet: torch.nn.Module, x_T: torch.Tensor, cond: Cond, steps: int,
             shift: int, generator: torch.Generator | list[torch.Generator] | None = None,
             renoise: Literal["unshifted", "shifted"] = "unshifted") -> torch.Tensor:
    """x0 after `steps` (1-4) shifted-LCM steps from x_T; `generator` draws the re-noising noise (one per image
    when a list, as diffusers' schedulers take it).
    renoise="shifted" is a diagnostic, not the released rule: x0 is re-noised to the next SHIFTED timestep,
    so every refinement input carries exactly the noise its conditioning timestep says."""
    check_steps(steps)
    sched = adapter.student_scheduler(shift)  # the shifted LCM scheduler; a flow family's TimestepShiftFlowScheduler
    sched.set_timesteps(steps, device=x_T.device)
    if renoise == "shifted":  # the x0-renoise sampler (teacher.py) on the shifted grid, with the student
        grid = sched.timesteps.tolist()
        spec = SamplerSpec(name="x0-renoise", steps=len(grid), timesteps=grid, guidance_scale=0.0)
        predict = adapter.guided_predict(unet, cond, 0.0)
        return sample(predict, x_T.float(), spec, adapter.scheduler_config, adapter.process, generator)
    x = x_T
    for t in sched.timesteps:
        out = adapter.unet_call(unet, x, t.expand(x.shape[0]), cond)
        x = sched.step(out.float(), t, x.float(), generator=generator).prev_sample
    return x

