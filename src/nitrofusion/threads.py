"""How many CPU threads torch may use: the rule that keeps a shared small machine from collapsing.

OpenMP threads spin while they wait for each other. When a process asks for as many threads as the
machine has cores and anything else runs beside it, the spinning threads fight for the cores and the
step time collapses. Measured on a 2-core machine (docs/studies/cpu-threads.md): mini `distill` at 2 threads
trains 31 images/s alone but 8 images/s beside one single-threaded process, while 1 thread trains 27 alone
and 25 beside it. So the default leaves one core for everything else.

Torch-free: `set_default_environment` runs in the CLI before torch is imported (OMP_NUM_THREADS is read
at import), `apply` where a config names a count.
"""
from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set or `taskset`), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_threads(cores: int, local_processes: int = 1) -> int:
    """Each of the machine's processes gets its share of the cores, less one core left free: 1 on 2 cores."""
    return max(1, cores // max(1, local_processes) - 1)


def _local_processes(environ=os.environ) -> int:
    try:  # set by `accelerate launch` / torchrun for every process on this machine
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _automatic(environ) -> int:
    return auto_threads(usable_cores(), _local_processes(environ))


def set_default_environment(environ=os.environ) -> None:
    """Give OpenMP the automatic count unless the user chose one (OMP_NUM_THREADS wins)."""
    environ.setdefault("OMP_NUM_THREADS", str(_automatic(environ)))


def apply(threads: int) -> int:
    """Set torch's intra-op threads: `threads` if > 0, else OMP_NUM_THREADS if set, else the automatic rule."""
    import torch

    if threads <= 0:
        from_env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(from_env) if from_env.isdigit() and int(from_env) > 0 else _automatic(os.environ)
    torch.set_num_threads(threads)
    return threads
