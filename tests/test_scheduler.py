import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from nitrofusion import TimestepShiftLCMScheduler
from nitrofusion.method.diffusion import conditioning_timestep, student_timestep
from nitrofusion.method.step import student_one_step

SDXL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
            steps_offset=1, prediction_type="epsilon")


@pytest.mark.parametrize("shift, expected", [
    (250, {1: [249], 2: [249, 124], 3: [249, 187, 124], 4: [249, 187, 124, 62]}),
    (500, {1: [499], 2: [499, 249], 3: [499, 374, 249], 4: [499, 374, 249, 124]}),
])
def test_timesteps_match_the_released_grid(shift, expected):
    s = TimestepShiftLCMScheduler.from_config(EulerDiscreteScheduler(**SDXL).config, shifted_timestep=shift)
    for n, ts in expected.items():
        s.set_timesteps(n)
        assert s.timesteps.tolist() == ts
        assert s.unshifted_timesteps.tolist() == [999, 749, 499, 249][: n] if n in (1, 4) else True
    s.set_timesteps(2)
    assert s.unshifted_timesteps.tolist() == [999, 499]
    s.set_timesteps(3)
    assert s.unshifted_timesteps.tolist() == [999, 749, 499]


def test_from_config_keeps_the_source_config_and_round_trips(tmp_path):
    src = EulerDiscreteScheduler(**{**SDXL, "beta_end": 0.02, "prediction_type": "v_prediction"})
    s = TimestepShiftLCMScheduler.from_config(src.config, shifted_timestep=500)
    assert s.config.beta_end == 0.02 and s.config.prediction_type == "v_prediction"
    assert s.config.original_inference_steps == 4 and s.config.shifted_timestep == 500
    s.save_pretrained(tmp_path)
    again = TimestepShiftLCMScheduler.from_pretrained(tmp_path)
    assert again.config.shifted_timestep == 500 and again.config.beta_end == 0.02


def _reference(model, x, steps, shift, ab, generator):
    """docs/method.md §5 written out by hand: UNet at floor(t*s/1000), x0 from alpha_bar[t'], LCM boundary
    scalings at t', fresh noise to the next unshifted t."""
    grid = {1: [999], 2: [999, 499], 3: [999, 749, 499], 4: [999, 749, 499, 249]}[steps]
    for i, t in enumerate(grid):
        tp = t * shift // 1000
        eps = model(x, tp)
        x0 = (x - (1 - ab[tp]).sqrt() * eps) / ab[tp].sqrt()
        scaled = tp * 10.0
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / math.sqrt(scaled**2 + 0.25)
        denoised = c_out * x0 + c_skip * x
        if i + 1 == len(grid):
            return denoised
        noise = torch.randn(x.shape, generator=generator)
        nxt = grid[i + 1]
        x = ab[nxt].sqrt() * denoised + (1 - ab[nxt]).sqrt() * noise


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_outputs_match_the_spec_for_the_same_generator(steps):
    torch.manual_seed(0)
    w = torch.randn(1, 4, 1, 1)
    model = lambda x, t: torch.tanh(x * w + t / 1000.0)
    s = TimestepShiftLCMScheduler.from_config(EulerDiscreteScheduler(**SDXL).config, shifted_timestep=250)
    s.set_timesteps(steps)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_T
    g = torch.Generator().manual_seed(7)
    for t in s.timesteps:
        x = s.step(model(x, int(t)), t, x, generator=g).prev_sample
    ref = _reference(model, x_T, steps, 250, s.alphas_cumprod, torch.Generator().manual_seed(7))
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_training_x0_is_the_one_step_sample(mini_adapter):
    """The trainer's one-step x0 (docs/method.md §2.3) is what the scheduler returns at 1 step (boundary scalings
    at t'=249 differ from 1 by < 1e-7)."""
    unet = mini_adapter.teacher_unet
    x_T = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = mini_adapter.encode_prompts(["a photo of a bag"] * 3)
    with torch.no_grad():
        x0 = student_one_step(mini_adapter, unet, x_T, cond, shift=250)
        t_s = student_timestep(250)
        eps = unet(x_T, torch.full((3,), t_s), cond["states"]).sample
    ab = mini_adapter.alphas_cumprod[t_s]
    assert t_s == 249
    torch.testing.assert_close(x0, (x_T - (1 - ab).sqrt() * eps) / ab.sqrt())
    from nitrofusion.sampling.student import generate

    torch.testing.assert_close(generate(mini_adapter, unet, x_T, cond, 1, 250), x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [250, 500, 1000, 1])
def test_the_schedulers_shift_is_the_methods_conditioning_timestep(shift):
    """The released scheduler's float rule and the method's integer floor agree on every timestep."""
    sched = TimestepShiftLCMScheduler(shifted_timestep=shift)
    t = torch.arange(1000)
    assert torch.equal(sched.shift(t), conditioning_timestep(t, shift))
    assert student_timestep(shift) == int(conditioning_timestep(torch.tensor(999), shift))
