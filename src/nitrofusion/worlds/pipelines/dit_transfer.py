"""`nitrofusion transfer` for the DiT families (SD3 / SD3.5, FLUX.1): theta_custom + (theta_student - theta_base) over
the transformer, in fp32 key by key (docs/method.md §6), as the UNet families' transfer (export.py) does for a UNet.

Each of --student, --base and --custom is a run (a LoRA run's student/transformer holds its adapters merged), a
student folder, a pipeline folder, a transformer folder, or a transformer weights file (diffusers keys, or the
family's original layout: an SD3 single file's model.diffusion_model.* part, a FLUX BFL transformer). A family
(DiTTransfer) names its transformer class and how it reads a file; the sum, the refusals and the writing are shared.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import NitroFusionError
from ...io import tensor_bytes
from ...models.architectures import is_lora_weights
from .export import delta_sum, role_model, save_weights_file, staged_output
from .pipeline import SHIFT_METADATA_KEY, ModelRef, quiet_loading

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DiTTransfer:
    name: str  # as users say it: "SD3", "FLUX"
    transformer_class: str  # diffusers' class, e.g. "SD3Transformer2DModel"
    is_family_file: Callable[[Path], bool]  # from the header alone
    # a weights file's diffusers-key state dict; the config is the transformer's among the three folders, or None when
    # all three are files (a layout that needs it then assumes the family's released size)
    read_file: Callable[[Path, dict | None], State]
    # the student's sampling settings beside the shift, as file metadata: from its scheduler config (a folder), and
    # the keys carried over from its own header (a file)
    scheduler_metadata: Callable[[dict], dict[str, str]] = lambda config: {}
    metadata_keys: tuple[str, ...] = ()


@dataclass
class _Input:
    ref: ModelRef
    state: State | None = None  # a file's is read once a folder's config is known
    config: dict | None = None
    scheduler: Path | None = None  # the student's shifted scheduler folder, when it has one


def header_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's metadata (its header alone); empty for a torch file."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _folder_input(family: DiTTransfer, ref: ModelRef, role: str, transformer_folder: Callable) -> _Input:
    import diffusers

    folder = transformer_folder(ref) or ref.path / "transformer"
    if not (folder / "config.json").is_file():
        raise NitroFusionError(f"--{role} {ref.path} has no {family.name} transformer ({folder} is missing)")
    cls = getattr(diffusers, family.transformer_class)
    config = cls.load_config(folder)
    if config.get("_class_name") != family.transformer_class:
        raise NitroFusionError(f"--{role} {ref.path} holds a {config.get('_class_name')}, no {family.name} "
                               "transformer: transfer needs the three models of one family")
    with quiet_loading():
        model = cls.from_pretrained(folder)
    return _Input(ref, model.state_dict(), dict(config), ref.scheduler_dir)


def transfer(family: DiTTransfer, transformer_folder: Callable[[ModelRef], Path | None], student: str | Path,
             base: str | Path, custom: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> dict:
    """`out`: a student folder (transformer/ + the student's scheduler/ when it has one), or a diffusers-key
    .safetensors transformer file with the student's shift (and the family's other sampling metadata) in its header
    (sample it with `generate --base CUSTOM`)."""
    import diffusers

    out = Path(out)
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    roles = {"student": Path(student), "base": Path(base), "custom": Path(custom)}
    inputs: dict[str, _Input] = {}
    for role, path in roles.items():
        ref = role_model(path, role)
        if ref.kind == "file":
            if is_lora_weights(ref.path):
                raise NitroFusionError(f"--{role} {ref.path} is a LoRA file: transfer sums whole transformers; give "
                                       "the LoRA run (its student/transformer holds the adapters merged) or export "
                                       "one with --format diffusers")
            if not family.is_family_file(ref.path):
                raise NitroFusionError(f"--{role} {ref.path} holds no {family.name} transformer: transfer needs the "
                                       "three models of one family")
            inputs[role] = _Input(ref)
        else:
            inputs[role] = _folder_input(family, ref, role, transformer_folder)
    config = next((inputs[r].config for r in ("custom", "student", "base") if inputs[r].config is not None), None)
    if config is None and out.suffix != ".safetensors":  # before the sum: nothing to compute for a refusal
        raise NitroFusionError(f"no {family.name} transformer config among --student/--base/--custom (all are weights "
                               "files): give one of them as a folder, or --out FILE.safetensors")
    for item in inputs.values():
        if item.state is None:
            item.state = family.read_file(item.ref.path, config)
    student_in = inputs["student"]
    if student_in.scheduler is not None:
        scheduler = json.loads((student_in.scheduler / "scheduler_config.json").read_text())
        shift, metadata = scheduler["shifted_timestep"], family.scheduler_metadata(scheduler)
    else:
        header = header_metadata(student_in.ref.path) if student_in.ref.kind == "file" else {}
        shift = int(header[SHIFT_METADATA_KEY]) if SHIFT_METADATA_KEY in header else None
        metadata = {k: header[k] for k in family.metadata_keys if k in header}
    result = delta_sum({role: item.state for role, item in inputs.items()}, roles, dtype)
    with staged_output(out, tensor_bytes(result)) as tmp:
        if out.suffix == ".safetensors":
            save_weights_file(tmp, result, shift, metadata)
        else:
            with torch.device("meta"):
                model = getattr(diffusers, family.transformer_class).from_config(config)
            model.load_state_dict(result, assign=True)
            with quiet_loading():
                model.save_pretrained(tmp / "transformer", safe_serialization=True)
            if student_in.scheduler is not None:
                shutil.copytree(student_in.scheduler, tmp / "scheduler")
    return {"path": str(out), "tensors": len(result), "shift": shift}
