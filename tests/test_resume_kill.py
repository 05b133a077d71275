"""kill -9 of a real `nitrofusion distill` process, then --resume: same weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _run(args, env):
    return subprocess.Popen([sys.executable, "-m", "nitrofusion", "distill", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final(run):
    ck = sorted((run / "checkpoints").iterdir())[-1]
    return ck.name, load_file(str(ck / "student.safetensors")), load_file(str(ck / "pool.safetensors"))


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_teacher, tmp_path):
    from nitrofusion.worlds.mini.teacher import TeacherTrainConfig, save_teacher

    teacher_dir = tmp_path / "teacher"
    save_teacher(tiny_teacher.unet, TeacherTrainConfig(model=tiny_teacher.model, sampler=tiny_teacher.sampler),
                 teacher_dir, {"note": "random tiny teacher for tests"})
    # a cache of its own: the session's may hold text encodings and pairs that an in-process test made with 2
    # threads, whose last bits differ from a 1-thread process's on some CPUs (seen on Intel, not on AMD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NITROFUSION_CACHE": str(tmp_path / "cache")}
    common = ["--preset", "tiny", "--teacher", str(teacher_dir), "--set", "max_images=96", "--set", "threads=1"]

    straight = _run([*common, "--out", str(tmp_path / "straight")], env)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    victim = tmp_path / "victim"
    proc = _run([*common, "--out", str(victim)], env)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill as soon as a few complete checkpoints exist
        done = [p for p in (victim / "checkpoints").glob("step-*") if "." not in p.name] \
            if (victim / "checkpoints").exists() else []
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = sorted(p.name for p in (victim / "checkpoints").iterdir() if "." not in p.name)[-1]
    assert killed_at != "step-00000012"

    resumed = _run([*common, "--out", str(victim), "--resume"], env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    (n1, s1, p1), (n2, s2, p2) = _final(tmp_path / "straight"), _final(victim)
    assert n1 == n2 == "step-00000012"
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


@pytest.fixture(scope="module")
def tiny_setup(tiny_teacher, tmp_path_factory):
    """A saved tiny teacher and an uninterrupted run of 4 optimiser steps to compare against."""
    from nitrofusion.worlds.mini.teacher import TeacherTrainConfig, save_teacher

    root = tmp_path_factory.mktemp("kill-points")
    save_teacher(tiny_teacher.unet, TeacherTrainConfig(model=tiny_teacher.model, sampler=tiny_teacher.sampler),
                 root / "teacher", {"note": "random tiny teacher for tests"})
    common = ["--preset", "tiny", "--teacher", str(root / "teacher"), "--set", "max_images=32", "--set",
              "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the straight run encodes its prompts and makes its pairs in a 1-thread process, as each victim does in its own
    # cache (the session's may hold ones made with 2 threads, whose last bits differ on some CPUs)
    straight = _run([*common, "--out", str(root / "straight")], {**env, "NITROFUSION_CACHE": str(root / "cache")})
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    return root, common, env


@pytest.mark.parametrize("point", ["pairs-shard:2", "checkpoint-write:3", "checkpoint-rename:3", "student-save:1"])
def test_kill_9_at_each_write_then_resume_matches(tiny_setup, tmp_path, point):
    """Killed while a pair shard, a checkpoint (mid-write; after the rename, before pruning) or student/ is being
    written: --resume ends with the uninterrupted run's weights and a complete student folder."""
    root, common, env = tiny_setup
    victim_env = {**env, "NITROFUSION_KILL_AT": point, "NITROFUSION_CACHE": str(tmp_path / "cache")}
    proc = _run([*common, "--out", str(tmp_path / "run")], victim_env)
    assert proc.wait(timeout=300) == -signal.SIGKILL, proc.stderr.read()
    resumed = _run([*common, "--out", str(tmp_path / "run"), "--resume"], {**env, "NITROFUSION_CACHE":
                                                                          str(tmp_path / "cache")})
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    (n1, s1, p1), (n2, s2, p2) = _final(root / "straight"), _final(tmp_path / "run")
    assert n1 == n2 == "step-00000004"
    assert all(torch.equal(s1[k], s2[k]) for k in s1) and all(torch.equal(p1[k], p2[k]) for k in p1)
    assert (tmp_path / "run" / "student" / "scheduler" / "scheduler_config.json").is_file()
