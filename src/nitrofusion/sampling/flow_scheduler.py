"""TimestepShiftFlowScheduler: the 1-4 step sampler of a flow-matching student (docs/method.md §8, the analogue
of §5's TimestepShiftLCMScheduler).

The grid is the LCM grid with original_inference_steps=4 ({999, 749, 499, 249}; 1-3 steps take the same
points as the UNet families). At grid point t the network is called at the shifted t' = floor(t * s / 1000),
x0 is read at sigma' = t' / 1000 (x0 = x - sigma' v), and x0 is re-noised with fresh noise to the next
UNSHIFTED t: x = (1 - t/1000) x0 + (t/1000) n. It subclasses diffusers' FlowMatchEulerDiscreteScheduler, so
a stock StableDiffusion3Pipeline drives it (`set_timesteps`, `timesteps`, `step`, `order`), and so does a stock
FluxPipeline, which calls `set_timesteps(sigmas=..., mu=...)` without the step count.

Stock pipelines call `step` without a generator, so the re-noising draws from torch's global generator;
`scheduler.generator` (a generator or one per image) makes it reproducible, as `generate` does.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ..method.diffusion import RectifiedFlow

GRID_POINTS = 4  # original_inference_steps of the released 1-4 step sampler


def lcm_grid(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The released sampler's unshifted grid for `steps` (1-4): LCM's rule with original_inference_steps=4."""
    from .scheduler import TimestepShiftLCMScheduler

    lcm = TimestepShiftLCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=GRID_POINTS)
    lcm.set_timesteps(steps)
    return [int(t) for t in lcm.unshifted_timesteps]


class TimestepShiftFlowScheduler(FlowMatchEulerDiscreteScheduler):
    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: float | None = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False,
                 shifted_timestep: int = 250) -> None:
        # the parent's whole signature, so a saved config loads without "ignored attribute" lines; its sigma
        # warps (shift, dynamic shifting) are the teacher's and never apply to this grid
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=False,
                         base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
                         max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas,
                         shift_terminal=shift_terminal, use_karras_sigmas=use_karras_sigmas,
                         use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
                         time_shift_type=time_shift_type, stochastic_sampling=stochastic_sampling)
        self.unshifted_timesteps: list[int] = []
        self.generator: torch.Generator | list[torch.Generator] | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas=None, mu: float | None = None, timesteps=None) -> None:
        n = self.config.num_train_timesteps
        if num_inference_steps is None and sigmas is not None:
            # FluxPipeline passes its sigma grid (linspace(1, 1/n, n)) and dynamic shift mu instead of the step count:
            # only the grid's length is read here (this sampler's points and shift are its own, mu is the teacher's)
            num_inference_steps = len(sigmas)
        self.unshifted_timesteps = lcm_grid(int(num_inference_steps or GRID_POINTS), n)
        shifted = [t * self.config.shifted_timestep // n for t in self.unshifted_timesteps]
        self.timesteps = torch.tensor(shifted, dtype=torch.float32, device=device)  # what the network is fed
        self.sigmas = torch.cat([self.timesteps / n, torch.zeros(1, device=device)])
        self.num_inference_steps = len(shifted)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | list[torch.Generator] | None = None, per_token_timesteps=None,
             return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        flow = RectifiedFlow(self.config.num_train_timesteps)  # the training-time arithmetic, bit for bit
        rows = sample.shape[0]
        t = self.timesteps[i].to(sample.device).long().expand(rows)
        x0 = flow.x0(model_output.float(), sample.float(), t)  # read at the conditioning noise level
        if i + 1 < len(self.unshifted_timesteps):
            noise = randn_tensor(x0.shape, generator=generator if generator is not None else self.generator,
                                 device=x0.device, dtype=x0.dtype)
            prev = flow.add_noise(x0, noise, torch.full((rows,), self.unshifted_timesteps[i + 1], device=x0.device))
        else:
            prev = x0
        self._step_index += 1
        prev = prev.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def flow_student_scheduler(scheduler_config: dict, shift: int) -> TimestepShiftFlowScheduler:
    """The student's scheduler, from the teacher's flow-matching scheduler config."""
    return TimestepShiftFlowScheduler(num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
                                      shift=float(scheduler_config.get("shift", 1.0)), shifted_timestep=shift)
