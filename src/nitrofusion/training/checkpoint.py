"""Run checkpoints: written to a temporary folder, fsynced, then renamed into place, so the newest
`step-*` folder is always complete; the last K are kept. Loading never unpickles arbitrary objects
(safetensors, JSON, and torch.load(weights_only=True) for optimiser state)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import faults
from ..errors import NitroFusionError, describe


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name)


def latest(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def load_newest_readable(run_dir: Path, log=print) -> tuple[Path, tuple[dict, dict, dict]] | None:
    """The newest checkpoint that loads, and its contents; an unreadable newer one (a write cut short by a
    crash or a full disk) is skipped with a message naming it. None if there is no checkpoint; an error if
    there are checkpoints and none loads."""
    dirs = checkpoint_dirs(run_dir)
    problems = []
    for path in reversed(dirs):
        try:
            loaded = load(path)
        except NitroFusionError as e:
            problems.append(str(e))
            continue
        for message in problems:
            log(f"{message.split('; delete it')[0]}; resuming from the older {path.name} instead")
        return path, loaded
    if problems:
        raise NitroFusionError(f"no readable checkpoint in {run_dir / 'checkpoints'} ({problems[0]}); start a new "
                               "run or restore a checkpoint")
    return None


def save(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], optim: dict,
         state: dict, keep: int) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, tensors, optim, state)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint (or its space) behind
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    faults.point("checkpoint-rename")  # renamed into place, older ones not yet pruned
    for abandoned in [d for d in checkpoint_dirs(run_dir) if d.name > final.name]:  # e.g. an unreadable one
        shutil.rmtree(abandoned, ignore_errors=True)  # skipped at resume: a timeline this run has left
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp-*"):  # left behind by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write(tmp: Path, tensors: dict[str, dict[str, torch.Tensor]], optim: dict, state: dict) -> None:
    tmp.mkdir()
    for name, sd in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    faults.point("checkpoint-write")  # tensors written, optimiser state and position not yet
    torch.save(optim, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)


def load(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    try:
        tensors = {f.stem: load_file(str(f)) for f in path.glob("*.safetensors")}
        optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except Exception as e:
        raise NitroFusionError(f"checkpoint {path} is unreadable ({describe(e)}); delete it to resume from the "
                               "one before") from None
    return tensors, optim, state
