"""Cross-process locks on cache entries, so two runs that share one NITROFUSION_CACHE make each entry once.

One lock file per entry (a pair shard, the pair index, a text encoding, real-image latents), locked with
`fcntl.flock`. The kernel drops a flock when the process holding it exits or is killed (kill -9 included), so
a crashed run never leaves a lock that blocks the next one, and no pid-liveness rule is needed. Lock files stay
on disk, empty: deleting one that another process may be waiting on would let two holders in.

NFS: Linux turns flock on NFS into a POSIX byte-range lock (kernel 2.6.12 and later), which holds across machines
only on a mount with working lock support (NLM for NFSv3, built into v4); with `nolock` or `local_lock=all` it
locks one machine only. Two machines may then both make an entry: every write is an atomic rename and an entry is
the same bytes whoever makes it, so the result is still whole, only the work is done twice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; one process per cache, as before the locks
    fcntl = None


@contextlib.contextmanager
def locked(path: str | Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (created if missing) for the with-block and yield True; with
    `wait=False`, yield False at once instead when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # read-only is enough for flock, and lets a user lock a file another user created in a shared cache
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        os.close(fd)  # closing the descriptor drops the lock
