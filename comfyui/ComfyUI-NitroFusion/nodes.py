"""Sampling a NitroFusion flow-matching student (SD3 / SD3.5, FLUX.1) in ComfyUI, as `nitrofusion generate` samples it
(TimestepShiftFlowScheduler, docs/method.md §8 of the nitrofusion repository):

- the 1-4 step grid is LCM's with original_inference_steps=4, t in {999, 749, 499, 249}, on the UNWARPED flow
  path sigma = t / 1000 (the teacher's sigma shift does not apply to the student);
- at grid point t the transformer is conditioned on t' = floor(t * S / 1000) and x0 is read at sigma' = t' / 1000:
  x0 = x - sigma' v;
- between steps x0 is re-noised with fresh noise to the next unshifted sigma: x = sigma n + (1 - sigma) x0.

"NitroFusion Student Sigmas" gives the grid (its first sigma is 1.0, so the sampler starts from pure noise as the
pipeline does; it stands for t = 999), "NitroFusion Flow Timestep Shift" patches the model; sample with
SamplerCustom, the `lcm` sampler (it is exactly the re-noising step above) and CFG 1. A FLUX.1 student also takes
its embedded guidance through ComfyUI's FluxGuidance node (ComfyUI's FLUX model reads sigma as its timestep, so the
same patch applies).

The arithmetic lives in plain functions without ComfyUI imports, so nitrofusion's test suite checks it against
its own scheduler; ComfyUI is only needed to run the nodes.
"""

from __future__ import annotations

import torch

TRAIN_TIMESTEPS = 1000
GRID = (999, 749, 499, 249)  # original_inference_steps = 4


def student_grid(steps: int) -> list[int]:
    """The unshifted grid for 1-4 steps: LCM's rule with original_inference_steps=4 (1: 999; 2: 999, 499;
    3: 999, 749, 499 ... as the student's scheduler takes them)."""
    if not 1 <= steps <= 4:
        raise ValueError(f"a NitroFusion student samples 1-4 steps, not {steps}")
    skip = len(GRID) // steps
    return list(GRID[::skip][:steps])


def student_sigmas(steps: int) -> torch.Tensor:
    """The sampler's sigmas: 1.0 (pure noise, standing for t = 999), the later grid points / 1000, then 0."""
    grid = student_grid(steps)
    return torch.tensor([1.0] + [t / TRAIN_TIMESTEPS for t in grid[1:]] + [0.0], dtype=torch.float32)


def shifted_sigma(sigma: torch.Tensor, shift: int) -> torch.Tensor:
    """sigma -> sigma' = floor(t * S / 1000) / 1000, where t = round(1000 sigma) (1.0 counts as t = 999)."""
    t = torch.clamp(torch.round(sigma.double() * TRAIN_TIMESTEPS), max=TRAIN_TIMESTEPS - 1)
    return (torch.floor(t * shift / TRAIN_TIMESTEPS) / TRAIN_TIMESTEPS).to(sigma.dtype)


def shifted_model_function(shift: int):
    """A ComfyUI `model_function_wrapper`: the model called at sigma' instead of sigma. For a flow model ComfyUI's
    input scaling is the identity and its x0 is x - sigma v, so this is exactly x0 = x - sigma' v(x, t')."""
    def wrapper(apply_model, args: dict) -> torch.Tensor:
        return apply_model(args["input"], shifted_sigma(args["timestep"], shift), **args["c"])
    return wrapper


class NitroFusionFlowTimestepShift:
    """MODEL -> MODEL: condition the student's transformer on the shifted timestep (docs/method.md §8)."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node interface
        return {"required": {"model": ("MODEL",),
                             "shifted_timestep": ("INT", {"default": 250, "min": 1, "max": 1000})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "sampling/nitrofusion"

    def patch(self, model, shifted_timestep: int):
        patched = model.clone()  # a wrapper on the clone: the loaded model stays as it was
        patched.set_model_unet_function_wrapper(shifted_model_function(shifted_timestep))
        return (patched,)


class NitroFusionStudentSigmas:
    """INT -> SIGMAS: the 1-4 step grid of a NitroFusion flow student, for SamplerCustom."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's node interface
        return {"required": {"steps": ("INT", {"default": 1, "min": 1, "max": 4})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "sigmas"
    CATEGORY = "sampling/nitrofusion"

    def sigmas(self, steps: int):
        return (student_sigmas(steps),)


NODE_CLASS_MAPPINGS = {"NitroFusionFlowTimestepShift": NitroFusionFlowTimestepShift,
                       "NitroFusionStudentSigmas": NitroFusionStudentSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"NitroFusionFlowTimestepShift": "NitroFusion Flow Timestep Shift",
                              "NitroFusionStudentSigmas": "NitroFusion Student Sigmas"}
