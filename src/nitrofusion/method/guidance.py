"""The guidance knob at one step (docs/method.md §10): the student takes the guidance scale w as conditioning.

As in latent-consistency UNets, w enters through the UNet's time embedding: diffusers'
`UNet2DConditionModel(time_cond_proj_dim=D)` adds `cond_proj(timestep_cond)` to the timestep's features, where
`timestep_cond` is a sinusoidal embedding of (w - 1) * 1000. Stock diffusers pipelines compute exactly that from
their `guidance_scale` (and skip classifier-free guidance) whenever the UNet has `time_cond_proj_dim`, so an exported
student is driven by `guidance_scale=w` with no code of ours. `cond_proj` starts at zero: at initialisation the
guided student is bit for bit the unconditioned one, whatever w.

A conditioning dict carries w per row as `cond["guidance"]` ([B] float): the teacher applies it as a per-row
classifier-free guidance scale, the student embeds it, the heads are conditioned on it (heads.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

Cond = dict[str, torch.Tensor]  # method/adapter.py's (that module imports this one)
KEY = "guidance"  # the conditioning entry holding each row's guidance scale w
EMBED_DIM = 256  # time_cond_proj_dim of a guided student (LCM-Dreamshaper's value)
GUIDANCE_PROJECTION = "time_embedding.cond_proj.weight"  # the guidance input's one weight
GUIDANCE_FILE = "guidance.json"  # in a guided student's folder: {"range": [w_min, w_max], "default": w}


def scale_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, dim] sinusoidal embedding of w * 1000 (VDM's): diffusers pipelines' `get_guidance_scale_embedding`,
    which they call on guidance_scale - 1 (`timestep_cond`)."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -step).to(w.device)
    angles = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def timestep_cond(unet: nn.Module, cond: Cond, dtype: torch.dtype) -> torch.Tensor | None:
    """What `unet` takes as `timestep_cond` for these rows: the embedding of w - 1 when the UNet has a guidance
    input and the rows carry w, else None (the teacher, an unguided student)."""
    dim = getattr(getattr(unet, "config", None), "time_cond_proj_dim", None)
    if dim is None or KEY not in cond:
        return None
    return scale_embedding(cond[KEY].float() - 1, dim).to(dtype)  # on w's device: no host sync per UNet call


def prompt_only(cond: Cond) -> Cond:
    """The prompt's part of a conditioning (w removed): what encoders, backbones and null prompts deal in."""
    return {k: v for k, v in cond.items() if k != KEY}


def with_guidance(cond: Cond, w: float | torch.Tensor | None) -> Cond:
    """`cond` with every row at guidance w (a number, or [B] values); unchanged when w is None."""
    if w is None:
        return cond
    first = next(iter(cond.values()))
    values = torch.as_tensor(w, dtype=torch.float32)
    values = values.expand(first.shape[0]) if values.ndim == 0 else values
    return {**cond, KEY: values.float().to(first.device)}


def draw_scales(n: int, scale_range: list[float], gen: torch.Generator) -> torch.Tensor:
    """n guidance scales uniform in [w_min, w_max] (LCM's distillation draws w the same way)."""
    lo, hi = scale_range
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64).float()


def default_scale(scale_range: list[float], teacher_scale: float) -> float:
    """The w a guided student samples at when none is given: the teacher sampler's own, inside the trained range."""
    return float(min(max(teacher_scale, scale_range[0]), scale_range[1]))


def add_guidance_input(unet: nn.Module, dim: int = EMBED_DIM) -> nn.Module:
    """A copy of a UNet2DConditionModel with a guidance input (time_cond_proj_dim=dim): the same weights, and
    the new `time_embedding.cond_proj` at zero, so it computes exactly what `unet` does for every w."""
    # diffusers lists the keys a config left at their defaults in `_use_default_values` and resets them on load
    config = {k: v for k, v in unet.config.items() if k != "_use_default_values"} | {"time_cond_proj_dim": dim}
    guided = nn.Module.to(type(unet).from_config(config), dtype=next(unet.parameters()).dtype)  # nn's: no warning
    missing, unexpected = guided.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {GUIDANCE_PROJECTION}:
        raise RuntimeError(f"a guidance input changes only time_embedding.cond_proj; missing {missing}, "
                           f"unexpected {unexpected}")
    nn.init.zeros_(guided.time_embedding.cond_proj.weight)
    return guided.to(next(unet.parameters()).device).train(unet.training)


def head_features(w: torch.Tensor, dim: int) -> torch.Tensor:
    """[B, dim] features of w for the heads' projection term (heads.py): sines and cosines of w at octave
    frequencies, so scales from ~0.1 to 100 stay apart."""
    freqs = 2.0 ** torch.arange(dim // 2, dtype=torch.float32, device=w.device) * (math.pi / 64)
    angles = w.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
