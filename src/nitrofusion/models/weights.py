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
    problem = safetensors_problem(path) if path.suffix == ".safetensors" else None
    if problem:  # from the header alone: a cut-short download named as such, not as a reader's error
        raise NitroFusionError(f"cannot read UNet weights: {problem}; fetch or write the file again")
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


SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors' own cap: a longer "header" means the file is no safetensors


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A .safetensors file's header and the file size it describes (8 + header + the last tensor's end), from the
    file's first bytes alone; no tensor is read. A file cut short inside its header, or that is no safetensors
    file, is one line naming it."""
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if length > SAFETENSORS_HEADER_LIMIT:
            raise NitroFusionError(f"{path} is not a safetensors file (its first bytes are no header length)")
        if len(head) < 8 or 8 + length > size:
            raise NitroFusionError(f"{path} is cut short inside its header ({size:,} bytes)")
        try:
            header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            raise NitroFusionError(f"{path} is not a safetensors file (its header is not a tensor index)") from None
    return header, 8 + length + end


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot be loaded, from its header and size alone (an interrupted download is shorter
    than its header says); None when it is whole."""
    try:
        _, expected = safetensors_header(path)
    except NitroFusionError as e:
        return str(e)
    size = path.stat().st_size
    if size < expected:
        return f"{path} is cut short: {size:,} of its {expected:,} bytes"
    if size > expected:
        return f"{path} is {size:,} bytes, more than the {expected:,} its header describes"
    return None


def _plain(path: Path) -> bool:
    """A plain weights file or index (`model.safetensors`, `model-00001-of-00002.safetensors`, `...index.json`), not
    a variant (`model.fp16.safetensors`), which loaders read only when asked for it."""
    return "." not in Path(path.name.removesuffix(".index.json")).stem


def _loaded(folder: Path) -> tuple[list[Path], list[Path]]:
    """(index files, .safetensors files) a loader reads from a model folder: the plain ones, or the variants when a
    folder holds no plain weights at all."""
    folder = Path(folder)
    indexes, files = sorted(folder.glob("*.index.json")), sorted(folder.glob("*.safetensors"))
    plain = any(_plain(p) for p in (*indexes, *files, *folder.glob("*.bin")))
    return [i for i in indexes if _plain(i) == plain], [f for f in files if _plain(f) == plain]


def loaded_safetensors(folder: Path) -> list[Path]:
    """The .safetensors files a loader reads from a model folder (plain ones before variants)."""
    return _loaded(folder)[1]


def weights_problem(folder: Path, weights_name: str = "diffusion_pytorch_model.safetensors") -> str | None:
    """What an interrupted download left wrong in a model folder, from file names, index files and safetensors
    headers alone (no weight is read): its config.json missing, no weights file (`weights_name` expected), a shard
    its index names missing, a .safetensors file cut short. None when nothing is."""
    import json

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return f"{folder / 'config.json'} is missing"
    indexes, files = _loaded(folder)
    for index in indexes:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index} is not a weights index (no weight_map)"
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            return f"{index.name} names {folder / missing[0]}, which is missing"
    if not files and not indexes and not any(folder.glob("*.bin")):
        return f"no weights file: {folder / weights_name} is missing"
    return next((problem for problem in map(safetensors_problem, files) if problem), None)


def header_numel(folder: Path) -> int | None:
    """Parameters in the .safetensors files a loader reads from a model folder, from their headers alone (no tensor
    is read); None when the folder holds weights in another format."""
    import math

    files = loaded_safetensors(folder)
    if not files:
        return None
    total = 0
    for path in files:
        header, _ = safetensors_header(path)
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total
