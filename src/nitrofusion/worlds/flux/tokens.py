"""FLUX's token layout (docs/method.md §8, FLUX): the method core works on unpacked latents [B, C, h, w]; the
transformer reads 2x2-patch tokens [B, h/2 * w/2, 4C] with position ids, packed and unpacked by FluxPipeline's own
static methods."""

from __future__ import annotations

import torch


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, h/2 * w/2, 4C] tokens, as FluxPipeline packs them."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h/2 * w/2, 4C] tokens -> [B, C, h, w] latents (FluxPipeline._unpack_latents, given pixels at scale 1)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, h, w, 1)


def ids(h: int, w: int, text_tokens: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(text ids, image ids) as FluxPipeline builds them for an h x w latent: zeros for the text tokens, (0, row, col)
    for the image tokens on the (h/2, w/2) grid."""
    from diffusers import FluxPipeline

    image = FluxPipeline._prepare_latent_image_ids(None, h // 2, w // 2, device, dtype)
    return torch.zeros(text_tokens, 3, device=device, dtype=dtype), image


def step_in_tokens(sched):
    """`sched` stepping unpacked latents [B, C, h, w] as FluxPipeline steps its tokens [B, h/2 * w/2, 4C]: packed,
    stepped, unpacked. The step is elementwise except for its re-noising noise, which the scheduler draws in the
    shape it is given; so the training-time sampler (sampling/student.py, on unpacked latents) draws the stock
    pipeline's noise, bit for bit. Only this instance's `step` changes: its saved config is the plain scheduler's."""
    step = sched.step

    def packed_step(model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        if sample.ndim != 4:
            return step(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
        h, w = sample.shape[-2:]
        prev = step(pack(model_output), timestep, pack(sample), *args, return_dict=False, **kwargs)[0]
        prev = unpack(prev, h, w)
        if not return_dict:
            return (prev,)
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)

    sched.step = packed_step
    return sched
