"""Real `nitrofusion distill` processes stopped every way a cluster stops them, then --resume: the uninterrupted
run's weights, bitwise. A stop signal (SIGTERM: checkpoint at the next step, exit 75) and kill -9 from outside, to
`python -m nitrofusion` processes; kill -9 at each kind of write (a pair shard, a checkpoint mid-write and after its
rename, the student folder), in forks of the test process (tests/forked.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from forked import forked_cli
from safetensors.torch import load_file

from nitrofusion.preemption import REQUEUE_EXIT

pytestmark = pytest.mark.slow
FINAL = "step-00000008"  # 64 images of 8


def _run(args, env):
    return subprocess.Popen([sys.executable, "-m", "nitrofusion", "distill", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final(run):
    ck = sorted((run / "checkpoints").iterdir())[-1]
    return ck.name, load_file(str(ck / "student.safetensors")), load_file(str(ck / "pool.safetensors"))


def _checkpoints(run) -> list[str]:
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if "." not in p.name) if folder.exists() else []


def _newest_step(run) -> int:
    done = _checkpoints(run)
    return int(done[-1].removeprefix("step-")) if done else 0


def _wait_for_checkpoints(proc, run, n: int) -> None:
    """Until the run's newest complete checkpoint is n steps past the newest now (the loop is past its setup)."""
    target = _newest_step(run) + n
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _newest_step(run) < target:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be stopped"


@pytest.fixture(scope="module")
def setup(tiny_teacher, tmp_path_factory):
    """A saved tiny teacher, the common arguments, and one uninterrupted run of 8 optimiser steps."""
    from nitrofusion.worlds.mini.teacher import TeacherTrainConfig, save_teacher

    tmp_path = tmp_path_factory.mktemp("straight")

    save_teacher(tiny_teacher.unet, TeacherTrainConfig(model=tiny_teacher.model, sampler=tiny_teacher.sampler),
                 tmp_path / "teacher", {"note": "random tiny teacher for tests"})
    # a cache of its own: the session's may hold text encodings and pairs that an in-process test made with 2
    # threads, whose last bits differ from a 1-thread process's on some CPUs (seen on Intel, not on AMD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NITROFUSION_CACHE": str(tmp_path / "cache")}
    common = ["--preset", "tiny", "--teacher", str(tmp_path / "teacher"), "--set", "max_images=64", "--set",
              "threads=1"]
    err = tmp_path / "straight.err"
    assert forked_cli(["distill", *common, "--out", str(tmp_path / "straight")], env, err) == 0, err.read_text()
    return common, env, _final(tmp_path / "straight")


def _assert_same(run, expected) -> None:
    (n1, s1, p1), (n2, s2, p2) = expected, _final(run)
    assert n1 == n2 == FINAL
    assert all(torch.equal(s1[k], s2[k]) for k in s1) and all(torch.equal(p1[k], p2[k]) for k in p1)
    assert (run / "student" / "scheduler" / "scheduler_config.json").is_file()


def test_sigterm_then_kill_9_then_resume_matches_an_uninterrupted_run(setup, tmp_path):
    common, env, expected = setup  # the straight run's cache: its pairs and text encodings are reused
    victim = tmp_path / "victim"

    proc = _run([*common, "--out", str(victim)], env)  # SIGTERM: finish the step, checkpoint, one line, exit 75
    _wait_for_checkpoints(proc, victim, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == REQUEUE_EXIT
    said = [line for line in proc.stderr.read().splitlines()
            if line.strip() and not line.startswith(("distill:", "teacher pairs:"))]
    stopped_at = _checkpoints(victim)[-1]  # (the progress bars aside) one line: where it stopped, how to go on
    assert len(said) == 1 and f"stopped by SIGTERM after step {int(stopped_at[5:])} (" in said[0], said
    assert "--resume" in said[0] and stopped_at != FINAL
    marker = json.loads((victim / "preempted.json").read_text())  # for job scripts behind a launcher
    assert marker == {"signal": "SIGTERM", "step": int(stopped_at[5:]), "images": 8 * int(stopped_at[5:])}

    proc = _run([*common, "--out", str(victim), "--resume"], env)  # kill -9 from outside, mid-run
    _wait_for_checkpoints(proc, victim, 2)
    assert not (victim / "preempted.json").exists()  # the requeued run took it
    proc.kill()
    proc.wait()
    assert _checkpoints(victim)[-1] != FINAL

    proc = _run([*common, "--out", str(victim), "--resume"], env)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    _assert_same(victim, expected)


def test_kill_9_at_each_write_then_resume_matches_an_uninterrupted_run(setup, tmp_path):
    """One run killed four times, each resume killed at the next kind of write (every point below is a real
    SIGKILL the process sends itself: faults.py; the processes are forks of this one, tests/forked.py): each
    recovery starts from what the last one left."""
    common, env, expected = setup
    env = {**env, "NITROFUSION_CACHE": str(tmp_path / "cache")}  # the victim makes its own pairs
    run, err = tmp_path / "run", tmp_path / "stderr"
    for point in ("pairs-shard:2", "checkpoint-write:3", "checkpoint-rename:3", "student-save:1"):
        args = ["distill", *common, "--out", str(run)] + (["--resume"] if run.exists() else [])
        assert forked_cli(args, {**env, "NITROFUSION_KILL_AT": point}, err) == -signal.SIGKILL, (point,
                                                                                               err.read_text())
    assert _checkpoints(run)[-1] == FINAL  # killed while writing student/: resume must still write it
    assert forked_cli(["distill", *common, "--out", str(run), "--resume"], env, err) == 0, err.read_text()
    _assert_same(run, expected)
