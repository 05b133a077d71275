"""Reading UNet weights and checking them against a UNet, for every caller: a teacher's replacement UNet
(`sdxl.teacher_unet`), a student's `student_init`, a UNet file given to `generate` / `export` / `transfer`.

Files are read weights-only (safetensors, or torch files with `weights_only=True`), so a file can never run
code; a key layout that does not match is one line with counts and one example key.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NitroFusionError, describe

# prefixes a UNet state dict can carry: a pipeline-level dict, the original (A1111 / ComfyUI) layout
KEY_PREFIXES = ("unet.", "model.diffusion_model.")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A UNet state dict from .safetensors or a weights-only torch file; never unpickles objects."""
    if not path.is_file():
        raise NitroFusionError(f"UNet weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a corrupt/unsupported file for the user
        raise NitroFusionError(f"cannot read UNet weights {path} ({describe(e)}); give a .safetensors file") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and safetensors metadata (empty for torch files)."""
    state = read_weights(path)
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    return state, meta


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in KEY_PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def check_same_layout(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], other_name: str,
                      ref_name: str, hint: str = "") -> None:
    """`other` has exactly `ref`'s keys and shapes, or one line says how it differs (and `hint`)."""
    missing = [k for k in ref if k not in other]
    unexpected = [k for k in other if k not in ref]
    shapes = [k for k in ref if k in other and tuple(other[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        detail = (f" ({tuple(other[example].shape)} vs {tuple(ref[example].shape)})" if example in shapes else "")
        hint = f"; {hint}" if hint else ""
        raise NitroFusionError(f"{other_name} does not match {ref_name}: {len(missing)} missing, {len(unexpected)} "
                               f"unexpected, {len(shapes)} wrong-shape keys (e.g. '{example}'{detail}){hint}")


def load_checked(unet: torch.nn.Module, state: dict[str, torch.Tensor], other_name: str, ref_name: str,
                 hint: str = "") -> None:
    """Copy `state` into `unet` in the UNet's own dtypes, after checking keys and shapes."""
    own = unet.state_dict()
    check_same_layout(own, state, other_name, ref_name, hint)
    unet.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def header_numel(folder: Path) -> int | None:
    """Parameters in the .safetensors files of a model folder, from their headers alone (no tensor is read); None
    when the folder holds weights in another format."""
    import json
    import math
    import struct

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total
