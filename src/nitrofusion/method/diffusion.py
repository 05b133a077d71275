"""The diffusion arithmetic the method uses, in one place (docs/method.md §2.3-2.4): the forward process
q(x_t | x0), x0 from a model output, and the timestep shift that conditions the student.

The released scheduler (sampling/scheduler.py) computes the same shift as `(t * s / N).long()` in float; for the
integer timesteps it sees that equals the floor below, which tests/test_scheduler.py checks on every t.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """q(x_t | x0): sqrt(ab) x0 + sqrt(1-ab) noise (alpha_bar broadcast per sample)."""
    ab = alpha_bar.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def x0_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                   prediction_type: str) -> torch.Tensor:
    """x0 from a model output at noise level alpha_bar (broadcast per sample).
    eps: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)  (docs/method.md §2.3); v: x0 = sqrt(ab) x_t - sqrt(1-ab) v."""
    ab = alpha_bar.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    if prediction_type == "epsilon":
        return (x_t - (1 - ab).sqrt() * output) / ab.sqrt()
    if prediction_type == "v_prediction":
        return ab.sqrt() * x_t - (1 - ab).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ConfigError(f"unsupported prediction_type '{prediction_type}'")


def conditioning_timestep(t: torch.Tensor, shift: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """t' = floor(t * s / N): the timestep the student is conditioned on at input timestep t (§2.3)."""
    return torch.div(t * shift, num_train_timesteps, rounding_mode="floor")


def student_timestep(shift: int, num_train_timesteps: int = 1000) -> int:
    """t_s = floor(999 * s / 1000): what the released scheduler feeds the UNet at its 1-step grid [999]."""
    return int(conditioning_timestep(torch.tensor(num_train_timesteps - 1), shift, num_train_timesteps))
