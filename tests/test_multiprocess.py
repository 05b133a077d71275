"""Two CPU processes of one DDP job over gloo: head sampling, pool refresh and the head updates must be identical on
every rank, or the ranks train different discriminators; a stop signal to one rank stops both at the same step, and
the run resumes exactly. The reference run is a real `accelerate launch`; the others are the same script in ranks
forked from the test process (tests/forked.py: real processes, real collectives and signals, without 3 interpreter
starts per run)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from forked import fork_ranks, wait_ranks
from ports import free_port
from safetensors.torch import load_file

SCRIPT = textwrap.dedent('''
    import os
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from nitrofusion import config, preemption
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.training import distill
    from nitrofusion.data.pair_cache import process_state, training_data
    from nitrofusion.worlds import world_of_config

    out = Path(sys.argv[1])
    cfg = config.build(DistillConfig, "distill", "tiny", ["max_images=32", "pool.refresh_fraction=0.05",
                                                         "micro_batch=2", "grad_accum=4",
                                                         *[a for a in sys.argv[2:] if a != "RESUME"]])
    state = process_state()
    with preemption.stop_on_signals():  # as the CLI does: a stop signal ends the run at a safe point
        world = world_of_config(cfg)
        adapter = world.adapter(cfg)
        data = training_data(cfg, adapter, world.prompts(cfg), state)
        (out / f"pid{state.process_index}").write_text(str(os.getpid()))  # a signal now lands in step 1
        try:
            result = distill(cfg, adapter, data, out / "run", progress=False, resume="RESUME" in sys.argv)
        except preemption.Preempted as e:
            (out / f"stopped{state.process_index}").write_text(str(e))
            sys.exit(preemption.REQUEUE_EXIT)
    pool = result["pool"]
    tensors = {f"pool.{k}": v for k, v in pool.state_dict().items()}
    tensors["pool_generator"] = pool.generator_state()
    tensors.update({f"student.{k}": v for k, v in result["student"].state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{state.process_index}.safetensors"))
''')


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(tmp_path, *sets):
    """The script under a real `accelerate launch --multi_gpu` of 2 CPU processes."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(tmp_path / "train.py"), str(tmp_path), *sets]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _results(tmp_path)


def _fork(tmp_path, *sets) -> list[int]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return fork_ranks(SCRIPT, [str(tmp_path), *sets], ENV, free_port(), tmp_path)


def _forked(tmp_path, *sets):
    codes = wait_ranks(_fork(tmp_path, *sets))
    assert codes == [0, 0], [(tmp_path / f"rank{i}.err").read_text()[-3000:] for i in (0, 1)]
    return _results(tmp_path)


def _results(tmp_path):
    return [load_file(str(tmp_path / f"rank{i}.safetensors")) for i in (0, 1)]


def _identical(r0, r1):
    assert r0.keys() == r1.keys()
    different = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not different, different[:5]


@pytest.mark.slow
def test_two_processes_keep_bitwise_identical_pools_and_a_stopped_sharded_run_resumes_exactly(tmp_path):
    """One plain run (pools and students identical on both ranks), then a ZeRO-1 run that SIGUSR1 to rank 1 alone
    stops: both ranks checkpoint at the same step and exit 75; --resume reaches the plain run's weights bitwise
    (ZeRO-1 changes where the AdamW state lives, not the arithmetic; every rank restores its own RNG streams,
    loader position, pool and optimiser shard)."""
    plain = _launch(tmp_path / "plain")
    _identical(*plain)
    # training did happen: 2 optimiser steps of 2 ranks x 4 micro-batches x 2 images (2 < 4 t*: some heads get no
    # gradient on one rank and some on the other; the collectives must still line up)
    log = (tmp_path / "plain" / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"images": 32' in log[-1]

    zero = tmp_path / "zero"
    pids = _fork(zero, "student_optim.zero=true")
    deadline = time.time() + 300
    while not (zero / "pid1").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (zero / "pid1").exists(), (zero / "rank1.err").read_text()[-3000:]
    os.kill(int((zero / "pid1").read_text()), signal.SIGUSR1)  # before step 1 ends: the stop comes after it
    err = [(zero / f"rank{i}.err").read_text()[-3000:] for i in (0, 1)]
    assert wait_ranks(pids) == [75, 75], err  # both ranks exit with the requeue status
    stopped = [(zero / f"stopped{i}").read_text() for i in (0, 1)]
    assert "stopped by SIGUSR1 after step 1 (16 images)" in stopped[1], err
    assert "stopped by a signal to another process after step 1 (16 images)" in stopped[0]
    assert [p.name for p in (zero / "run" / "checkpoints").iterdir()] == ["step-00000001"]
    assert (zero / "run" / "preempted.json").is_file()  # a launcher's status says "failed"; this says why
    optim = torch.load(zero / "run" / "checkpoints" / "step-00000001" / "optim.pt", weights_only=True)
    n_params = sum(1 for k in plain[0] if k.startswith("student."))
    assert len(optim["g"]["state"]) == n_params  # the checkpoint holds every rank's shard, consolidated

    r0, r1 = _forked(zero, "student_optim.zero=true", "RESUME")
    for k in plain[0]:
        assert torch.equal(r0[k], plain[0][k]) and torch.equal(r1[k], plain[0][k]), k


@pytest.mark.slow
def test_two_processes_keep_bitwise_identical_lora_students(tmp_path):
    """DDP averages a LoRA student's adapter gradients only; pools and adapters stay identical on both ranks."""
    _identical(*_forked(tmp_path, "student.kind=lora", "student.rank=4", "student_optim.lr=1e-3", "max_images=32"))


@pytest.mark.slow
def test_fsdp_shards_a_full_student_with_ddp_s_arithmetic_and_resumes_bitwise(tmp_path):
    """FSDP2 (training/fsdp.py) on 2 CPU processes with gloo: the gathered student and the pool are identical on both
    ranks and equal a DDP run's of the same global batch within float rounding (FSDP changes where the weights,
    gradients and AdamW state live and the reduction's order, not the arithmetic); a run stopped by a signal after
    step 1 and resumed reaches the uninterrupted FSDP run's weights bit for bit (the checkpoint holds the gathered
    student and optimiser state; every rank re-shards it)."""
    small = ("micro_batch=2", "grad_accum=2", "max_images=16")
    ddp = _forked(tmp_path / "ddp", *small)
    sharded = _forked(tmp_path / "fsdp", *small, "fsdp=true")
    _identical(*sharded)
    assert sharded[0].keys() == ddp[0].keys()
    worst = max((sharded[0][k].double() - ddp[0][k].double()).abs().max().item() for k in ddp[0]
                if ddp[0][k].is_floating_point())
    assert worst < 1e-6, worst
    log = [json.loads(line) for line in (tmp_path / "fsdp" / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[-1]["images"] == 16

    stopped = tmp_path / "stopped"
    pids = _fork(stopped, *small, "fsdp=true")
    deadline = time.time() + 300
    while not (stopped / "pid1").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (stopped / "pid1").exists(), (stopped / "rank1.err").read_text()[-3000:]
    os.kill(int((stopped / "pid1").read_text()), signal.SIGUSR1)
    err = [(stopped / f"rank{i}.err").read_text()[-3000:] for i in (0, 1)]
    assert wait_ranks(pids) == [75, 75], err
    r0, r1 = _forked(stopped, *small, "fsdp=true", "RESUME")
    for k in sharded[0]:
        assert torch.equal(r0[k], sharded[0][k]) and torch.equal(r1[k], sharded[0][k]), k


def test_fsdp_needs_processes_and_a_full_student_one_line_before_weights_load(tmp_path, capsys):
    from nitrofusion.cli import main
    from nitrofusion.training.fsdp import largest_unit, units

    for sets, needle in ((["fsdp=true"], "fsdp=true shards the student over processes, and this run has one"),
                         (["fsdp=true", "student.kind=lora"], "fsdp shards a full student"),
                         (["fsdp=true", "student_optim.zero=true"], "set student_optim.zero=false")):
        argv = ["distill", "--preset", "tiny", "--out", str(tmp_path / "run")]
        assert main(argv + [a for kv in sets for a in ("--set", kv)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "run").exists()
    # the units FSDP shards, innermost first: every parameter belongs to exactly one, the largest is one block
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ModuleList([torch.nn.Linear(4, 8),
                                                                            torch.nn.Linear(8, 2)]))
    model = torch.nn.Module()
    model.head, model.blocks = torch.nn.Linear(2, 2), torch.nn.ModuleList([block, torch.nn.Linear(2, 3)])
    assert units(model) == [block[1][0], block[1][1], block, model.blocks[1], model]
    assert largest_unit(model) == 8 * 4 + 8  # block[1][0]; `block` itself holds only its first Linear (20)
