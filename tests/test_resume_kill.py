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
    from nitrofusion.mini.teacher import TeacherTrainConfig, save_teacher

    teacher_dir = tmp_path / "teacher"
    save_teacher(tiny_teacher.unet, TeacherTrainConfig(model=tiny_teacher.model, sampler=tiny_teacher.sampler),
                 teacher_dir, {"note": "random tiny teacher for tests"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
