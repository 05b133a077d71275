"""Files: atomic writes (temporary name, fsync, rename) and the cache folder."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def disk_errors(what: str, where: str | Path, fix: str = "then rerun with --resume (the last complete "
                "checkpoint is intact)"):
    """A full disk or a read-only folder mid-run becomes one line that says what to do, not a traceback."""
    from .errors import NitroFusionError

    try:
        yield
    except OSError as e:
        raise NitroFusionError(f"cannot write {what} to {where} ({e.strerror or e}); free space or fix "
                               f"permissions, {fix}") from None


def cache_dir(sub: str) -> Path:
    root = Path(os.environ.get("NITROFUSION_CACHE", Path.home() / ".cache" / "nitrofusion"))
    path = root / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) then fsync and rename tmp over path: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
