"""The student being trained: a full fp32 copy of the teacher UNet (the paper's setting, docs/method.md §1) or
LoRA adapters on the teacher's own frozen UNet ([ours], docs/method.md §7).

A LoRA student keeps ONE UNet in memory. With the adapters on it is the student; with them off (`base_only`)
it is the frozen backbone E and the teacher sampler. Only the adapters train, so the student's gradients and
optimiser state are the adapters' alone. Everything the trainer does with "the student's weights" (checkpoint,
EMA, resume, DDP averaging) goes through `trainable_state`, which is the whole state dict of a full student
and the adapter factors of a LoRA one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import NitroFusionError, describe
from .architectures import is_dit_keys, is_lora

ADAPTER = "nitrofusion"  # the PEFT adapter name of a LoRA student
LORA_DIR = "lora"  # run_dir/student/lora: a LoRA student's trained adapters


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    if not getattr(model, "peft_config", None):  # diffusers sets it with the first adapter, drops it on unload:
        return []  # a full student's backbone calls skip the walk over every module
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(tuner_layers(model))


@contextlib.contextmanager
def base_only(model: nn.Module) -> Iterator[None]:
    """Run `model` as its frozen base: every PEFT adapter off, restored on exit. Sets PEFT's flag directly:
    its public `enable_adapters` also flips the adapters' requires_grad, which would detach them from a
    student graph still waiting for its backward. The student's own gradient checkpointing (diffusers' flags,
    on the same modules) is off too: its recomputation would run in the backward, outside this context, with
    the adapters back on (the backbone checkpoints whole blocks itself, inside base_only)."""
    layers = tuner_layers(model)
    if not layers:
        yield
        return
    was = [layer._disable_adapters for layer in layers]
    ckpt = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer._disable_adapters = True
    for m in ckpt:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, was, strict=True):
            layer._disable_adapters = flag
        for m in ckpt:
            m.gradient_checkpointing = True


def layer_names(unet: nn.Module) -> list[str]:
    """Names of the layers LoRA can adapt (Linear and ungrouped Conv2d)."""
    return [n for n, m in unet.named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]


def check_targets(unet: nn.Module, targets: list[str]) -> None:
    """Every target names at least one layer (PEFT's rule: the full name, or its ending after a dot); PEFT
    itself only fails when NONE matches, so a typo beside a valid name would otherwise be silently dropped."""
    names = layer_names(unet)
    network = "transformer" if hasattr(unet, "transformer_blocks") else "UNet"  # an MMDiT (world sd3) or a UNet
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            endings = sorted({n.split(".")[-1] if not n.endswith(".0") else ".".join(n.split(".")[-2:])
                              for n in names})
            raise NitroFusionError(f"student.targets: '{t}' matches no layer of the {network}; valid names include "
                                   f"{', '.join(endings[:12])}")


def add_lora(unet: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> None:
    """PEFT LoRA adapters (A: Kaiming-uniform, B: zeros, so the student starts as the teacher) on `targets`,
    in fp32 whatever the base's dtype (bf16 adapters would lose most of an update of lr ~1e-4)."""
    from peft import LoraConfig

    check_targets(unet, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights=True)
    unet.add_adapter(config, adapter_name=ADAPTER)
    for name, p in unet.named_parameters():
        if f".{ADAPTER}." in name:
            p.data = p.data.float()
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)


def remove_lora(unet: nn.Module) -> None:
    """The plain frozen teacher again: adapters unloaded, no checkpointing, eval mode."""
    unet.unload_lora()
    if getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    unet.requires_grad_(False).eval()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint and the EMA hold: a full student's state dict, or a LoRA student's adapter factors
    (under their module names, adapter name included)."""
    if not has_lora(model):
        return model.state_dict()
    return {n: p for n, p in model.named_parameters() if f".{ADAPTER}." in n}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not has_lora(model):
        model.load_state_dict(state)
        return
    own = trainable_state(model)
    if set(own) != set(state):
        raise NitroFusionError(f"the saved LoRA student has {len(state)} adapter tensors, this one {len(own)}; "
                               "resume with the run's own student.* settings")
    for k, p in own.items():
        p.copy_(state[k])


def peft_factors(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapters under diffusers' PEFT keys (`{module}.lora_A.weight`), as `save_lora_weights` wants them;
    from `state` (e.g. the EMA) when given, else the live weights."""
    state = state if state is not None else trainable_state(model)
    return {k.replace(f".{ADAPTER}.", "."): v.detach().float().cpu().contiguous() for k, v in state.items()}


def lora_metadata(model: nn.Module) -> dict:
    """The adapter's LoraConfig as diffusers stores it beside the factors (so rank, alpha and targets load back)."""
    return model.peft_config[ADAPTER].to_dict()


def lora_settings(model: nn.Module) -> tuple[int, float]:
    cfg = model.peft_config[ADAPTER]
    return int(cfg.r), float(cfg.lora_alpha)


def merged(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A plain fp32 UNet: a full student as is (with `state` loaded into a copy), a LoRA student's base with
    its adapters (from `state` when given) fused in, on the CPU. Fusing W + (alpha/r) B A is exact up to
    fp32 rounding; the adapters themselves are saved beside it for exact use."""
    if not has_lora(model):
        if state is None:
            return model
        out = copy.deepcopy(model)
        dtypes = {k: v.dtype for k, v in out.state_dict().items()}  # once: a state_dict() walks every module
        out.load_state_dict({k: v.to(dtypes[k]) for k, v in state.items()})
        return out
    out = nn.Module.to(copy.deepcopy(model), "cpu", torch.float32)  # nn's own: diffusers' warns on a dtype cast
    if state is not None:
        load_trainable_state(out, {k: v.cpu() for k, v in state.items()})
    out.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER])
    out.unload_lora()
    return out.requires_grad_(False)


def read_init_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file surfaces as several types
        raise NitroFusionError(f"student_init {path} is not a readable safetensors file ({describe(e)}); give a "
                               "UNet .safetensors or 'teacher'") from None


def check_init_kind(path: Path, kind: str, world: str) -> None:
    """A full student starts from a model file, a LoRA student from LoRA factors, each of its world's network (an
    SD3 transformer in world sd3, a UNet elsewhere): refuse the other in one line naming both."""
    keys = dict.fromkeys(read_init_keys(path))
    lora_file = is_lora(keys)
    dit, wants_dit = is_dit_keys(keys), world == "sd3"
    if dit != wants_dit:
        held = ("a LoRA of " if lora_file else "") + ("an SD3 transformer" if dit else "a UNet")
        raise NitroFusionError(f"student_init {path} holds {held}, but world '{world}' trains "
                               f"{'an SD3 transformer' if wants_dit else 'a UNet'}: give a file made from this "
                               "world's teacher, or 'teacher'")
    if kind == "lora" and not lora_file:
        network = "SD3 transformer" if dit else "UNet"
        raise NitroFusionError(f"student_init {path} is a full {network}, but student.kind is lora: give a LoRA file "
                               "(export --format lora of a LoRA run) or 'teacher', or set student.kind=full")
    if kind == "full" and lora_file:
        raise NitroFusionError(f"student_init {path} holds LoRA factors, but student.kind is full: set "
                               "student.kind=lora (with the file's rank) or give a full UNet file")


def load_init_factors(model: nn.Module, factors: dict[str, torch.Tensor], path: Path) -> None:
    """Start a LoRA student from saved PEFT factors (diffusers keys, `unet.` or `transformer.` prefix optional)."""
    own = trainable_state(model)
    wanted = {k.replace(f".{ADAPTER}.", "."): k for k in own}
    given = {k.removeprefix("unet.").removeprefix("transformer."): v for k, v in factors.items()}
    missing = [k for k in wanted if k not in given]
    extra = [k for k in given if k not in wanted]
    shapes = [k for k in wanted if k in given and given[k].shape != own[wanted[k]].shape]
    if missing or extra or shapes:
        example = (shapes or missing or extra)[0]
        raise NitroFusionError(f"student_init {path} does not match this LoRA student ({len(missing)} missing, "
                               f"{len(extra)} unexpected, {len(shapes)} wrong-shape factors, e.g. '{example}'); "
                               "set student.rank and student.targets to the file's")
    with torch.no_grad():
        for k, name in wanted.items():
            own[name].copy_(given[k])


def lora_parameter_count(unet: nn.Module, student) -> int:
    """The parameters of LoRA adapters of rank `student.rank` on `student.targets` (a StudentConfig), counted from
    the layers' shapes alone: it works on a meta-device UNet (the memory model, `distill --dry-run`)."""
    check_targets(unet, student.targets)
    total = 0
    for name, m in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in student.targets):
            continue
        if isinstance(m, nn.Linear):
            total += student.rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Conv2d):
            total += student.rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return total


def read_student_init(cfg, header_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The student_init weights (None for 'teacher'); a missing or unreadable file, or a file of the other
    student kind (a UNet for a LoRA student, LoRA factors for a full one), is a one-line error. `header_only`
    reads just the safetensors header: the CLI's check before any teacher pair is generated."""
    if cfg.student_init == "teacher":
        return None
    path = Path(cfg.student_init)
    if not path.is_file():
        raise NitroFusionError(f"student_init file not found: {path}; give a .safetensors UNet or 'teacher'")
    check_init_kind(path, cfg.student.kind, cfg.world)
    if header_only:
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file surfaces as several types
        raise NitroFusionError(f"student_init {path} is not a readable safetensors file ({describe(e)}); give a "
                               "UNet .safetensors or 'teacher'") from None
