"""The multi-step training stage: train the refinement steps the 1-4 step sampler will ask for.

The paper trains "for one step" and lets more steps refine "bottom-up". With the released sampler a
refinement step sees an input the one-step objective never trained: the previous x0 re-noised with
fresh noise to the next UNSHIFTED grid timestep t (749, 499, 249), while the UNet is conditioned on the
SHIFTED t' = floor(t * s / N) and x0 is read with alpha_bar[t'] (the released scheduler's rule, see
sampling/scheduler.py). This stage trains exactly that call. With probability p a sample's student input is
made by backward simulation, as in DMD2 (Yin et al. 2024): run the student itself, without gradient,
along the grid 999 -> t_1 -> ... -> t_k (x0, fresh noise, next t), then train the step at t_k with the
same adversarial loss against the same real sample. p = 0 is the one-step method bit for bit.
"""

from __future__ import annotations

import torch

from .adapter import Cond, ModelAdapter, cond_index
from .config import MultiStepConfig  # noqa: F401 - re-exported beside the stage it configures
from .diffusion import conditioning_timestep


def student_x0(adapter: ModelAdapter, student: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond,
               shift: int) -> torch.Tensor:
    """One sampler step's x0 for per-sample input timesteps t: condition on t', read x0 at t' (DDPM: with
    alpha_bar[t']; a flow: with sigma = t'/N)."""
    t_cond = conditioning_timestep(t, shift, adapter.num_train_timesteps)
    out = adapter.unet_call(student, x_t, t_cond, cond)
    return adapter.process.x0(out.float(), x_t.float(), t_cond)


@torch.no_grad()
def backward_simulate(adapter: ModelAdapter, student: torch.nn.Module, x_T: torch.Tensor, cond: Cond,
                      k: torch.Tensor, grid: list[int], shift: int, gen: torch.Generator,
                      depth: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the step each sample trains: sample i runs k[i] student steps from x_T along
    [N-1, *grid] (no gradient) and returns (x at grid[k[i]-1], that timestep); k[i] = 0 keeps (x_T, N-1).
    `depth` (>= max k, an FSDP run's deepest over all ranks): the student is called that many times, on one row
    whose result is dropped when no sample of this rank goes that deep; the samples and `gen` are unchanged."""
    n = adapter.num_train_timesteps
    x = x_T.clone()
    t = torch.full((x_T.shape[0],), n - 1, dtype=torch.long, device=x_T.device)
    process = adapter.process
    deepest = int(k.max()) if k.numel() else 0
    for _ in range(deepest + 1, (depth or 0) + 1):  # calls that only keep the ranks' collectives in step
        student_x0(adapter, student, x[:1], t[:1], cond_index(cond, slice(0, 1)), shift)
    for j in range(1, deepest + 1):
        rows = (k >= j).nonzero(as_tuple=True)[0]
        x0 = student_x0(adapter, student, x[rows], t[rows], cond_index(cond, rows), shift)
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)  # fresh, as at inference
        t_next = torch.full_like(rows, grid[j - 1])
        x[rows] = process.add_noise(x0, noise, t_next).to(x.dtype)
        t[rows] = t_next
    return x, t


def draw_refinement(batch: int, p: float, steps: int, gen: torch.Generator) -> torch.Tensor:
    """k per sample: 0 (the one-step sample) with probability 1 - p, else uniform over 1..steps."""
    chosen = torch.rand(batch, generator=gen) < p
    k = torch.randint(1, steps + 1, (batch,), generator=gen)
    return torch.where(chosen, k, torch.zeros_like(k))
