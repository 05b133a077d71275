"""FSDP2 for full students (`fsdp: true`; docs/guide/many-gpus.md): PyTorch's `fully_shard` on the student, so each
of N processes keeps 1/N of its fp32 weights, gradients and AdamW state, and gathers one block's weights at a time
for its forward and backward. What stays replicated on every process: the frozen teacher / backbone E and the text
encoders (no gradients, bf16: sharding them would save their weights once and cost a gather per call), and the head
pool, whose sampling and refresh must be identical on every rank (its gradients are averaged by hand, as without
FSDP: training/optim.py).

Accelerate does not wrap the student here (on CPUs it would fall back to DDP): every ModuleList element (a UNet's
resnets and transformer blocks, a DiT's blocks), innermost first, and then the root are sharded by `fully_shard`,
and the student's optimiser is built on the sharded parameters. Checkpoints hold the GATHERED student, EMA and
optimiser state (torch's full state dicts): the same files as a run without FSDP, written by rank 0, read back and
re-sharded by every rank. Gradients are reduce-scattered after every micro-batch (accumulating them unsharded would
hold the whole gradient on every GPU).
Mixed precision bf16: the blocks gather their weights in bf16 and reduce gradients in fp32 (`MixedPrecisionPolicy`);
the master weights stay fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NitroFusionError


def check_processes(processes: int) -> None:
    if processes < 2:
        raise NitroFusionError("fsdp=true shards the student over processes, and this run has one; launch 2 or more "
                               "(accelerate launch --num_processes N, or torchrun --nproc-per-node N) or set "
                               "fsdp=false")


def units(model: nn.Module) -> list[nn.Module]:
    """What is sharded as one unit, innermost first: every element of every ModuleList, at any depth (a UNet's
    resnets and transformer blocks inside its down/up blocks, a DiT's blocks), then the model. A unit's forward
    gathers the parameters it holds outside the units inside it."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            visit(child)
            if isinstance(child, nn.ModuleList):
                found.extend(child)

    visit(model)
    return [*found, model]


def largest_unit(model: nn.Module) -> int:
    """Parameters of the largest unit (its own, outside nested units): what one gather holds at once."""
    owner: dict[int, int] = {}
    for i, unit in enumerate(units(model)):  # innermost first: a parameter belongs to the first unit holding it
        for p in unit.parameters():
            owner.setdefault(id(p), i)
    sizes: dict[int, int] = {}
    for p in model.parameters():
        sizes[owner[id(p)]] = sizes.get(owner[id(p)], 0) + p.numel()
    return max(sizes.values(), default=0)


def shard_student(student: nn.Module, mixed_precision: str) -> None:
    """fully_shard every unit (`units`), innermost first, the student itself last (in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    for unit in units(student):
        fully_shard(unit, mp_policy=policy)


def deepest_of_all_ranks(depth: int) -> int:
    """The largest backward-simulation depth over the ranks (method/refine.py): a sharded student's forward gathers
    its weights from every rank, so every rank must call it as often."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([depth], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor as is)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank (a collective); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded student's whole state dict on every rank, on the CPU (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
    return {k: v.cpu() for k, v in state.items()}


def load_full_state(student: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A whole state dict (every rank holds it) into the sharded student: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(student, state, options=StateDictOptions(full_state_dict=True))


def plain_copy(student: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """An unsharded fp32 copy of the student on the CPU, with its whole weights (or `state`: e.g. the gathered
    EMA), for evaluation and saving; a collective when `state` is None."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(student).__mro__[1:] if not issubclass(c, FSDPModule))  # fully_shard's subclass off
    with torch.device("meta"):
        plain = cls.from_config(student.config)
    weights = full_state(student) if state is None else state
    plain.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    return plain


def full_optimizer_state(student: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimiser's state gathered whole (keyed by parameter names; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(student, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(student: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(student, opt, state, options=StateDictOptions(full_state_dict=True))


def shard_like(values: dict[str, torch.Tensor], student: nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors (an EMA from a checkpoint) sharded as the student's parameters of the same names are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(student.state_dict())
    out = {}
    for k, v in values.items():
        p = params[k]
        out[k] = (distribute_tensor(v.to(p.device, torch.float32), p.device_mesh, p.placements)
                  if isinstance(p, DTensor) else v.to(p.device, torch.float32))
    return out
