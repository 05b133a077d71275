"""A second process beside the main one, for work that does not need the main one's results yet.

Why a process and not more threads: OpenMP threads spin while they wait for each other, and the mini
world's small tensors scale poorly past one thread (threads.py: distill trains 27 images/s at one thread,
31 at two). Two single-threaded processes use a 2-core machine almost twice over instead. The demo
splits the teacher pairs between both, and gives the helper the held-out pairs and the teacher's
metrics while the student trains.

Jobs are plain module-level functions (they are pickled into a spawned interpreter), and a job's result
must not depend on which process ran it: `Inline` runs the same functions in this process, on a
machine with no core to spare, and gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context

from .. import threads
from ..quiet import quiet_dependencies


def _init_worker(num_threads: int) -> None:
    import os

    os.environ["OMP_NUM_THREADS"] = str(num_threads)
    quiet_dependencies()  # a spawned interpreter starts with the dependencies' loggers loud
    threads.apply(num_threads)


class Helper:
    """One spawned worker process with `num_threads` torch threads; jobs run one after another."""

    processes = 2  # with the main one

    def __init__(self, num_threads: int = 1) -> None:
        self.num_threads = num_threads
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"),
                                         initializer=_init_worker, initargs=(num_threads,))

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Helper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return f"a helper process ({self.num_threads} thread{'s' if self.num_threads > 1 else ''})"


class Inline:
    """The same interface, run in this process at submit time: for a machine with one usable core."""

    num_threads = 0
    processes = 1

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # delivered by .result(), as a process pool would
            future.set_exception(e)
        return future

    def close(self) -> None:
        pass

    def __enter__(self) -> Inline:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def describe(self) -> str:
        return "no helper process (one usable core)"


def start_helper(main_threads: int, cores: int | None = None) -> Helper | Inline:
    """A helper with the cores the main process leaves free (at least one), or Inline when none are."""
    free = (cores if cores is not None else threads.usable_cores()) - main_threads
    return Helper(free) if free >= 1 else Inline()
