"""Our ComfyUI node pack (comfyui/ComfyUI-NitroFusion) samples a flow student as our scheduler does. ComfyUI is not
installed in CI, so the node's arithmetic is driven here the way ComfyUI drives it: SamplerCustom puts the first
sigma times the noise into the latent (CONST.noise_scaling), the `lcm` sampler (comfy/k_diffusion/sampling.py
sample_lcm) takes the model's x0 and re-noises it to the next sigma, and the model's x0 is CONST's x - sigma v at the
sigma the node's wrapper passes on. On a hand-built velocity field the result must be our
TimestepShiftFlowScheduler's at 1-4 steps."""

import importlib.util
from pathlib import Path

import pytest
import torch

NODE = Path(__file__).resolve().parents[1] / "comfyui" / "ComfyUI-NitroFusion" / "nodes.py"


def _nodes():
    spec = importlib.util.spec_from_file_location("nitrofusion_comfyui_nodes", NODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A made-up transformer: depends on the sample and, non-linearly, on the timestep it is conditioned on."""
    t = t.reshape(-1, *([1] * (x.ndim - 1))).float()
    return torch.tanh(x) * (1 + t / 1000) + torch.sin(t / 37.0)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("shift", [250, 500])
def test_the_nodes_sample_as_our_flow_scheduler(steps, shift):
    from nitrofusion.sampling.flow_scheduler import TimestepShiftFlowScheduler

    nodes = _nodes()
    shape = (2, 4, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    ours = TimestepShiftFlowScheduler(shifted_timestep=shift)
    ours.set_timesteps(steps)
    x, gen = noise.clone(), torch.Generator().manual_seed(1)
    for t in ours.timesteps:  # what StableDiffusion3Pipeline does with the student's scheduler
        x = ours.step(_velocity(x, t.expand(shape[0])), t, x, generator=gen).prev_sample

    def apply_model(x, sigma, **_):  # ComfyUI's BaseModel for a flow model: x0 = x - sigma v(x, 1000 sigma)
        return x - _velocity(x, sigma * 1000) * sigma.reshape(-1, 1, 1, 1)

    model = nodes.shifted_model_function(shift)
    sigmas = nodes.NitroFusionStudentSigmas().sigmas(steps)[0]
    y, gen = sigmas[0] * noise + (1 - sigmas[0]) * torch.zeros(shape), torch.Generator().manual_seed(1)
    for i in range(len(sigmas) - 1):  # comfy's sample_lcm
        y = model(apply_model, {"input": y, "timestep": sigmas[i] * torch.ones(shape[0]), "c": {}})
        if sigmas[i + 1] > 0:
            y = sigmas[i + 1] * torch.randn(shape, generator=gen) + (1 - sigmas[i + 1]) * y
    torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
    assert (sigmas[1:-1] * 1000).round().long().tolist() == ours.unshifted_timesteps[1:]


def test_the_shift_is_the_authors_rule_and_bad_step_counts_are_refused():
    nodes = _nodes()
    sigma = torch.tensor([1.0, 0.749, 0.499, 0.249])
    assert (nodes.shifted_sigma(sigma, 250) * 1000).round().tolist() == [249, 187, 124, 62]  # floor, as trained
    with pytest.raises(ValueError, match="1-4 steps"):
        nodes.student_grid(5)
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
