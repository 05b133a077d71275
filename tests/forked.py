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
