"""Files: atomic writes (temporary name, fsync, rename) and the cache folder."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import faults


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a nested dict / list / tuple (what a write of it needs on disk, give or take
    its headers)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_bytes(where: str | Path) -> int | None:
    """Free space on the file system that holds `where` (or its nearest existing parent)."""
    path = Path(where).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def disk_errors(what: str, where: str | Path, fix: str = "then rerun with --resume (the last complete "
                "checkpoint is intact)", needed: int | None = None):
    """A full disk or a read-only folder mid-run becomes one line that says what to do, not a traceback; on a full
    disk (or quota) it says how much the write needs and how much is free."""
    from .errors import NitroFusionError

    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and needed:
            free = free_bytes(where)
            reason += f"; it needs about {_size(needed)}" + (f", {_size(free)} free there" if free is not None else "")
        raise NitroFusionError(f"cannot write {what} to {where} ({reason}); free space or fix permissions, "
                               f"{fix}") from None


def cache_dir(sub: str) -> Path:
    root = Path(os.environ.get("NITROFUSION_CACHE", Path.home() / ".cache" / "nitrofusion"))
    path = root / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None], fault: str | None = None) -> None:
    """Call write(tmp) then fsync and rename tmp over path: readers see the old file or the new, never half.
    `fault`: the name of the faults.py point passed once tmp is written (tests fill the disk there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        if fault:
            faults.point(fault)
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
                            metadata: dict[str, str] | None = None, fault: str | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fault)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
