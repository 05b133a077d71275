"""A real stop signal to this test process at a chosen moment: the N-th call of a function (inside
`preemption.stop_on_signals()`, which records it instead of dying)."""

import signal
from collections.abc import Callable


def signalled_on_call(fn: Callable, n: int, signum: int = signal.SIGTERM) -> Callable:
    """fn, sending this process `signum` as its n-th call starts."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signum)
        return fn(*args, **kwargs)

    return wrapped
