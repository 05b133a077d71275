"""Named sections of a training step, timed only while a `Stopwatch` is running (`bench --size mini`): the
code that does the work marks its parts with `section(name)`, which costs nothing otherwise.

On a GPU each section synchronises before and after, so its time is the device's, not the launch's; that
removes the overlap between sections, so the sum is slightly above an unprofiled step's time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

_active: Stopwatch | None = None


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    watch = _active
    if watch is None:
        yield
        return
    watch.sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        watch.sync()
        watch.totals[name] = watch.totals.get(name, 0.0) + time.perf_counter() - t0


class Stopwatch:
    """`with Stopwatch(device) as w: ...` then `w.totals`: seconds per section name, summed."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.totals = device, {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Stopwatch:
        global _active
        self._previous, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = self._previous
