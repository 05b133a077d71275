"""Preemption: stop at the next safe point when the scheduler asks, so the job can be requeued and resumed.

SLURM sends SIGTERM (or the signal given with `--signal`, commonly SIGUSR1) some time before it kills a job;
Kubernetes sends SIGTERM and waits `terminationGracePeriodSeconds`. The handler only records the signal: the
loops ask `requested()` at their safe points (after an optimiser step, after a pair shard is written), write
what resume needs and raise `Preempted`, which the CLI turns into one line and exit code REQUEUE_EXIT.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from .errors import NitroFusionError

REQUEUE_EXIT = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, try again"; a job script requeues on it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: signal.Signals | None = None


class Preempted(NitroFusionError):
    """A run stopped on request at a safe point; everything needed to continue is on disk."""


def _record(signum: int, _frame) -> None:
    global _received
    _received = signal.Signals(signum)


def requested() -> str | None:
    """The name of the stop signal this process received since the handlers went in, or None."""
    return _received.name if _received is not None else None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Record SIGTERM / SIGUSR1 instead of dying on them, for the duration of a command."""
    global _received
    if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread
        yield
        return
    _received = None
    previous = {s: signal.signal(s, _record) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received = None
