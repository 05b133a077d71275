"""`nitrofusion transfer` for SD3 / SD3.5: theta_custom + (theta_student - theta_base) over the transformer, in fp32
key by key (docs/method.md §6), as the UNet families' transfer (worlds/pipelines/export.py) does for a UNet.

Each of --student, --base and --custom is a run (a LoRA run's student/transformer holds its adapters merged), a
student folder, a StableDiffusion3Pipeline folder, a transformer folder, or a transformer weights file (diffusers
keys, or the original layout of an SD3 single file, whose model.diffusion_model.* part alone is read)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ...errors import NitroFusionError
from ...io import tensor_bytes
from ...models.architectures import is_dit_weights
from ..pipelines.export import delta_sum, role_model, save_weights_file, staged_output
from ..pipelines.pipeline import quiet_loading
from .pipeline import file_shift, read_transformer_state, transformer_folder


def _read(path: Path, role: str) -> tuple[dict[str, torch.Tensor], dict | None, int | None, Path | None]:
    """(diffusers-key state dict, transformer config or None, shift or None, its scheduler folder or None) of one
    input."""
    from diffusers import SD3Transformer2DModel

    ref = role_model(path, role)
    path = ref.path
    if ref.kind == "file":
        if not is_dit_weights(path):
            raise NitroFusionError(f"--{role} {path} is not an SD3 transformer (nor an SD3 single file): transfer "
                                   "needs the three models of one family")
        return read_transformer_state(path), None, file_shift(ref), None
    folder = transformer_folder(ref) or path / "transformer"
    if not (folder / "config.json").is_file():
        raise NitroFusionError(f"--{role} {path} has no SD3 transformer ({folder} is missing)")
    config = SD3Transformer2DModel.load_config(folder)
    if config.get("_class_name") != "SD3Transformer2DModel":
        raise NitroFusionError(f"--{role} {path} holds a {config.get('_class_name')}, not an SD3 transformer: "
                               "transfer needs the three models of one family")
    with quiet_loading():
        model = SD3Transformer2DModel.from_pretrained(folder)
    scheduler = ref.scheduler_dir
    shift = json.loads((scheduler / "scheduler_config.json").read_text())["shifted_timestep"] if scheduler else None
    return model.state_dict(), dict(config), shift, scheduler


def transfer(student: str | Path, base: str | Path, custom: str | Path, out: str | Path,
             dtype: torch.dtype | None = None) -> dict:
    """`out`: a student folder (transformer/ + the student's scheduler/ when it has one), or a diffusers-key
    .safetensors transformer file with the shift in its metadata (sample it with `generate --base CUSTOM`)."""
    from diffusers import SD3Transformer2DModel

    out = Path(out)
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    roles = {"student": Path(student), "base": Path(base), "custom": Path(custom)}
    read = {role: _read(path, role) for role, path in roles.items()}
    config = next((read[r][1] for r in ("custom", "student", "base") if read[r][1] is not None), None)
    if config is None and out.suffix != ".safetensors":  # before the sum: nothing to compute for a refusal
        raise NitroFusionError("no transformer config among --student/--base/--custom (all are weights files): "
                               "give one of them as a folder, or --out FILE.safetensors")
    _, _, shift, scheduler = read["student"]
    result = delta_sum({role: r[0] for role, r in read.items()}, roles, dtype)
    with staged_output(out, tensor_bytes(result)) as tmp:
        if out.suffix == ".safetensors":
            save_weights_file(tmp, result, shift)
        else:
            with torch.device("meta"):
                model = SD3Transformer2DModel.from_config(config)
            model.load_state_dict(result, assign=True)
            with quiet_loading():
                model.save_pretrained(tmp / "transformer", safe_serialization=True)
            if scheduler is not None:
                shutil.copytree(scheduler, tmp / "scheduler")
    return {"path": str(out), "tensors": len(result), "shift": shift}
