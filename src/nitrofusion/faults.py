"""Named crash points, for the tests that kill a run at a chosen moment and resume it.

NITROFUSION_KILL_AT=NAME[:N] sends this process SIGKILL the N-th time (default: the first) it passes
`point(NAME)`. Unset, a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

_passes: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("NITROFUSION_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
