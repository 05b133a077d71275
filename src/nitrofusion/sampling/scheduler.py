"""TimestepShiftLCMScheduler: NitroFusion's 1-4 step sampler (docs/method.md §5).

Behaves as the authors' released scheduler: the step grid is LCM's with original_inference_steps=4
({999, 749, 499, 249}); the UNet is called at t' = floor(t * s / 1000) and the x0 estimate uses
alpha_bar[t']; between steps x0 is re-noised with fresh noise to the next UNSHIFTED t.

Unlike the released class it declares LCMScheduler's full signature, so `from_config` on an SDXL
scheduler config keeps that config's betas instead of silently falling back to LCM's defaults.
"""

from __future__ import annotations

import contextlib
import inspect

import numpy as np
import torch
from diffusers import LCMScheduler
from diffusers.configuration_utils import register_to_config


class TimestepShiftLCMScheduler(LCMScheduler):
    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 4,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        shifted_timestep: int = 250,
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas,
            original_inference_steps=original_inference_steps, clip_sample=clip_sample,
            clip_sample_range=clip_sample_range, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, timestep_scaling=timestep_scaling,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.unshifted_timesteps: torch.Tensor | None = None

    def shift(self, timesteps: torch.Tensor) -> torch.Tensor:
        """t -> floor(t * s / N): the timestep the network is conditioned on."""
        return (timesteps * self.config.shifted_timestep / self.config.num_train_timesteps).long()

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps(*args, **kwargs)
        self.unshifted_timesteps = self.timesteps.clone()
        self.timesteps = self.shift(self.timesteps)  # what a pipeline iterates over and feeds the UNet

    @contextlib.contextmanager
    def _unshifted_grid(self):
        shifted = self.timesteps
        self.timesteps = self.unshifted_timesteps
        try:
            yield
        finally:
            self.timesteps = shifted

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        # The step index is looked up among the shifted timesteps (what the caller passes);
        # the next noise level comes from the unshifted grid.
        if self.step_index is None:
            self._init_step_index(timestep)
        with self._unshifted_grid():
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)


def config_for(cls, scheduler_config: dict) -> dict:
    """The keys of another scheduler's config that `cls` understands (no 'ignored attribute' warnings)."""
    accepted = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in scheduler_config.items() if k in accepted}


def shifted_scheduler(scheduler_config: dict, shift: int) -> TimestepShiftLCMScheduler:
    """The student's 1-4 step sampler on a model's noise schedule, at shifted timestep `shift`."""
    cfg = {**config_for(TimestepShiftLCMScheduler, scheduler_config), "shifted_timestep": shift,
           "original_inference_steps": 4}
    return TimestepShiftLCMScheduler.from_config(cfg)
