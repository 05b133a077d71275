"""One cache, two runs (issue 28): processes that need the same teacher pairs or text encodings in one
NITROFUSION_CACHE at the same time make each shard once, leave no corrupt, duplicated or mixed file, and end with
the very bytes one process alone makes; a process killed holding a shard's lock blocks no later run."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nitrofusion.data import pairs as pairs_module


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root but the lock files, by relative path: what a cache holds."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


class _Teacher:
    """The mini adapter with a stand-in teacher (x_T / 2, after `delay` seconds) that records who called it: no
    network to run, and with a delay two threads are sure to meet."""

    def __init__(self, adapter, delay: float = 0.0) -> None:
        self._adapter, self.delay, self.calls = adapter, delay, []

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def teacher_sample(self, x_T, cond, generator=None):
        self.calls.append(threading.current_thread().name)
        time.sleep(self.delay)
        return x_T / 2


def test_two_writers_make_each_shard_once_and_the_same_bytes(mini_adapter, tmp_path):
    """flock locks open file descriptions, so two threads contend as two processes do: each shard is sampled
    once in all, both callers return, and the folder is byte for byte one caller's alone."""
    from nitrofusion.data.pairs import generate_pairs
    from nitrofusion.worlds.mini.data import class_prompts

    args = (class_prompts(), 32, 0)
    kw = dict(shard_size=8, batch_size=8, progress=False)
    generate_pairs(_Teacher(mini_adapter), *args, tmp_path / "alone", **kw)
    slow = _Teacher(mini_adapter, delay=0.2)
    start = threading.Barrier(2)
    errors = []

    def run() -> None:
        start.wait()
        try:
            generate_pairs(slow, *args, tmp_path / "shared", **kw)
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, name=f"writer{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(slow.calls) == 4, (errors, slow.calls)  # 4 shards, one teacher call each
    assert set(slow.calls) == {"writer0", "writer1"}  # they shared the work
    assert _tree(tmp_path / "shared") == _tree(tmp_path / "alone")


def test_a_run_start_hashes_each_shard_once_and_still_finds_a_corrupt_one(mini_adapter, tmp_path, monkeypatch):
    """drop_corrupt_shards hashes every indexed shard; generate, index and load reuse those digests."""
    from nitrofusion.data.pair_cache import teacher_pairs
    from nitrofusion.distill_config import PairsConfig
    from nitrofusion.worlds.mini.data import class_prompts

    adapter, p = _Teacher(mini_adapter), PairsConfig(count=16, shard_size=4, batch_size=4)
    first = teacher_pairs(adapter, class_prompts(), p, 16, 0, tmp_path, progress=False)
    hashed = []
    real = pairs_module._sha256
    monkeypatch.setattr(pairs_module, "_sha256", lambda path: hashed.append(path.name) or real(path))
    again = teacher_pairs(adapter, class_prompts(), p, 16, 0, tmp_path, progress=False)
    assert sorted(hashed) == [f"shard-{s:05d}.safetensors" for s in range(4)] and len(adapter.calls) == 4
    assert torch.equal(first.x0, again.x0)
    shard = tmp_path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    hashed.clear()
    repaired = teacher_pairs(adapter, class_prompts(), p, 16, 0, tmp_path, progress=False)
    assert sorted(hashed) == [f"shard-{s:05d}.safetensors" for s in (0, 1, 2, 2, 3)]  # the remade one once more
    assert torch.equal(first.x0, repaired.x0) and len(adapter.calls) == 5


def test_a_lock_held_elsewhere_is_waited_for_and_dropped_when_its_process_is_killed(tmp_path):
    from nitrofusion.locks import locked

    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nitrofusion.locks import locked\n"
                               f"with locked({str(lock)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with locked(lock, wait=False) as held:
        assert not held
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with locked(lock, wait=False) as held:  # the kernel dropped the dead process's lock; the file stays
        assert held and lock.exists()


PAIRS = ["pairs", "--preset", "tiny", "--set", "pairs.count=32", "--set", "pairs.shard_size=8", "--set", "threads=1"]


def _pairs(cache: Path, teacher: Path, kill_at: str = "") -> subprocess.Popen:
    """`nitrofusion pairs` in a process of its own: 4 shards of 8 pairs, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NITROFUSION_CACHE": str(cache)}
    env.pop("NITROFUSION_KILL_AT", None)
    if kill_at:
        env["NITROFUSION_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-m", "nitrofusion", *PAIRS, "--teacher", str(teacher)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _pairs_here(cache: Path, teacher: Path, monkeypatch) -> None:
    """The same command in this process (no second interpreter to start), with one thread as the others have."""
    from nitrofusion.cli import main

    monkeypatch.setenv("NITROFUSION_CACHE", str(cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*PAIRS, "--teacher", str(teacher)]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_pairs_commands_in_one_cache_after_a_killed_one(tiny_teacher, tmp_path, monkeypatch):
    """A `pairs` run killed mid-way (holding shard 1's lock), then two started together in the same cache: both
    exit 0, and the cache holds each shard once, byte for byte what one process makes in a cache of its own."""
    from nitrofusion.worlds.mini.teacher import TeacherTrainConfig, save_teacher

    teacher = tmp_path / "teacher"
    save_teacher(tiny_teacher.unet, TeacherTrainConfig(model=tiny_teacher.model, sampler=tiny_teacher.sampler),
                 teacher, {"note": "random tiny teacher for tests"})
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    victim = _pairs(shared, teacher, kill_at="pairs-shard:2")
    _pairs_here(alone, teacher, monkeypatch)  # the reference, while the victim runs
    assert victim.wait(timeout=300) == -signal.SIGKILL, victim.stderr.read()
    (folder,) = (shared / "pairs").iterdir()
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors"]
    for encoding in (shared / "text").glob("minilm-*"):
        encoding.unlink()  # so the two runs below also meet over the text encodings
    runs = [_pairs(shared, teacher), _pairs(shared, teacher)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    got, want = _tree(shared), _tree(alone)
    assert list(got) == list(want)  # each shard once, no stray temporary file
    assert [k for k in got if "shard-" in k] == [f"pairs/{folder.name}/shard-{s:05d}.safetensors" for s in range(4)]
    assert [k for k in want if got[k] != want[k]] == []
