"""A CLI command in a forked child of this test process: a real process that a fault point can SIGKILL, without the
seconds a fresh interpreter spends importing torch and diffusers (the child has them already). For tests where the
crash, not the process start, is under test; tests/test_resume_kill.py still starts one real `python -m
nitrofusion` that is killed from outside."""

from __future__ import annotations

import os
from pathlib import Path


def forked_cli(argv: list[str], env: dict[str, str], stderr: Path) -> int:
    """`nitrofusion ARGV` in a forked child with `env` as its environment and fd 2 written to `stderr`: its exit
    status, or minus the signal that ended it (as subprocess.Popen.returncode)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.environ.clear()
            os.environ.update(env)
            from accelerate.state import AcceleratorState

            from nitrofusion import faults
            from nitrofusion.cli import main

            AcceleratorState._reset_state(reset_partial_state=True)  # as a fresh process has it
            faults.reset()
            code = main(argv)
        except BaseException:  # noqa: BLE001 - the child reports by its status; the traceback is in `stderr`
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def fork_ranks(script: str, argv: list[str], env: dict[str, str], port: int, stderr_dir: Path,
               world_size: int = 2) -> list[int]:
    """Start `script` as `world_size` ranks of one torch.distributed job, each a forked child with the environment
    `accelerate launch --multi_gpu` gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...): the
    collectives and signals are real, the interpreter start is not paid again. Returns the children's pids (wait
    on them with `wait_ranks`); rank r's fd 2 goes to STDERR_DIR/rankR.err."""
    pids = []
    for rank in range(world_size):
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 70
            try:
                fd = os.open(stderr_dir / f"rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                os.environ.clear()
                os.environ.update(env)
                os.environ.update({
                    "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(world_size),
                    "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"})
                import sys

                import torch
                from accelerate.state import AcceleratorState

                # a rank of the real launch has OMP_NUM_THREADS=1; and a thread pool inherited across fork deadlocks
                torch.set_num_threads(1)

                AcceleratorState._reset_state(reset_partial_state=True)  # as a fresh process has it
                sys.argv = ["train.py", *argv]
                code = 0
                exec(compile(script, "train.py", "exec"), {"__name__": "__main__"})
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - the child reports by its status; the traceback is in its stderr
                import traceback

                traceback.print_exc()
                code = 70
            finally:
                os._exit(code)
        pids.append(pid)
    return pids


def wait_ranks(pids: list[int], timeout: float = 600) -> list[int]:
    """Each rank's exit status, or minus the signal that ended it. A rank that fails leaves the others blocked in a
    collective: past `timeout` seconds every rank still running is killed (its status is then -SIGKILL)."""
    import signal
    import time

    status: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(status) < len(pids):
        for pid in pids:
            if pid not in status:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    status[pid] = os.waitstatus_to_exitcode(raw)
        if time.monotonic() > deadline:
            for pid in set(pids) - status.keys():
                os.kill(pid, signal.SIGKILL)
                status[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.02)
    return [status[pid] for pid in pids]
