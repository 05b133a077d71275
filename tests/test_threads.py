"""The default CPU thread count (threads.py): one core left free, the user's choice always wins."""
import os
import subprocess
import sys

import pytest
import torch

from nitrofusion import threads


@pytest.mark.parametrize("cores, processes, expected", [(1, 1, 1), (2, 1, 1), (4, 1, 3), (16, 1, 15), (16, 4, 3),
                                                        (2, 2, 1), (8, 16, 1)])
def test_auto_threads_leaves_one_core_per_machine_share(cores, processes, expected):
    assert threads.auto_threads(cores, processes) == expected


def test_default_environment_respects_the_users_choice(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    env = {}
    threads.set_default_environment(env)
    assert env == {"OMP_NUM_THREADS": "1"}
    env = {"OMP_NUM_THREADS": "2"}
    threads.set_default_environment(env)
    assert env == {"OMP_NUM_THREADS": "2"}
    env = {"LOCAL_WORLD_SIZE": "2"}
    monkeypatch.setattr(threads, "usable_cores", lambda: 16)
    threads.set_default_environment(env)
    assert env["OMP_NUM_THREADS"] == "7"


def test_apply_config_value_then_environment_then_rule(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.apply(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.apply(0) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads, "usable_cores", lambda: 3)
        assert threads.apply(0) == 2
    finally:
        torch.set_num_threads(before)


def test_cli_sets_the_default_before_torch_loads():
    # a fresh interpreter: OpenMP reads OMP_NUM_THREADS once, when torch is imported
    code = ("import os; from nitrofusion import cli, threads; threads.usable_cores = lambda: 2; "
            "cli.main(['presets']); import torch; print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["1", "1"]
