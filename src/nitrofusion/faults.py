"""Named fault points, for the tests that crash a run or fill its disk at a chosen moment.

NITROFUSION_KILL_AT=NAME[:N] sends this process SIGKILL the N-th time (default: the first) it passes
`point(NAME)`; NITROFUSION_DISK_FULL_AT=NAME[:N] raises ENOSPC there instead, as a full disk would in the middle
of that write. Unset, a point costs two environment lookups.
"""

from __future__ import annotations

import errno
import os
import signal

_passes: dict[tuple[str, str], int] = {}


def _hit(variable: str, name: str) -> bool:
    spec = os.environ.get(variable)
    if not spec:
        return False
    target, _, nth = spec.partition(":")
    if target != name:
        return False
    key = (variable, name)
    _passes[key] = _passes.get(key, 0) + 1
    return _passes[key] == int(nth or 1)


def point(name: str) -> None:
    if _hit("NITROFUSION_KILL_AT", name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _hit("NITROFUSION_DISK_FULL_AT", name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def reset() -> None:
    """Forget the passes counted so far (a test that injects a fault twice in one process)."""
    _passes.clear()
