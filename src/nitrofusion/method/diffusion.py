"""The diffusion arithmetic the method uses, in one place (docs/method.md §2.3-2.4): the forward process
q(x_t | x0), x0 from a model output, and the timestep shift that conditions the student.

A noise process maps the method's integer timesteps t in [0, N) to both operations: `VariancePreserving` is
the DDPM process of the UNet families (an alpha_bar table and a prediction type), `RectifiedFlow` the flow
path of the DiT families, sigma = t / N (docs/method.md §8). The method core calls only these two methods.

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


class NoiseProcess:
    num_train_timesteps: int = 1000

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from x0 and noise at per-sample integer timesteps t."""
        raise NotImplementedError

    def x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from the model's output at x_t, read at per-sample timesteps t."""
        raise NotImplementedError


class VariancePreserving(NoiseProcess):
    """DDPM: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) n; the output is eps, v or x0 (`prediction_type`)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, num_train_timesteps: int = 1000) -> None:
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self.num_train_timesteps = num_train_timesteps

    def add_noise(self, x0, noise, t):
        return add_noise(x0, noise, self.alphas_cumprod.to(x0.device)[t])

    def x0(self, output, x_t, t):
        return x0_from_output(output, x_t, self.alphas_cumprod.to(x_t.device)[t], self.prediction_type)


class RectifiedFlow(NoiseProcess):
    """x_sigma = (1 - sigma) x0 + sigma n with sigma = t / N; the output is the velocity v = n - x0, so
    x0 = x_sigma - sigma v (docs/method.md §8; diffusers' FlowMatchEulerDiscreteScheduler convention)."""

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.num_train_timesteps = num_train_timesteps

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.to(like.device, torch.float64) / self.num_train_timesteps).to(like.dtype).reshape(
            -1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0, noise, t):
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def x0(self, output, x_t, t):
        return x_t - self.sigma(t, x_t) * output


def conditioning_timestep(t: torch.Tensor, shift: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """t' = floor(t * s / N): the timestep the student is conditioned on at input timestep t (§2.3)."""
    return torch.div(t * shift, num_train_timesteps, rounding_mode="floor")


def student_timestep(shift: int, num_train_timesteps: int = 1000) -> int:
    """t_s = floor(999 * s / 1000): what the released scheduler feeds the UNet at its 1-step grid [999]."""
    return int(conditioning_timestep(torch.tensor(num_train_timesteps - 1), shift, num_train_timesteps))
