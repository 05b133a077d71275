"""Two CPU processes under `accelerate launch` (DDP over gloo): head sampling, pool refresh and the
head updates must be identical on every rank, or the ranks train different discriminators."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.training import distill
    from nitrofusion.data.pair_cache import process_state, training_data
    from nitrofusion.worlds import world_of_config

    out = Path(sys.argv[1])
    cfg = config.build(DistillConfig, "distill", "tiny", ["max_images=64", "pool.refresh_fraction=0.05",
                                                         "micro_batch=2", "grad_accum=4",
                                                         *[a for a in sys.argv[2:] if a != "RESUME"]])
    state = process_state()
    world = world_of_config(cfg)
    adapter = world.adapter(cfg)
    data = training_data(cfg, adapter, world.prompts(cfg), state)
    result = distill(cfg, adapter, data, out / "run", progress=False,
                     resume="RESUME" in sys.argv)
    pool = result["pool"]
    tensors = {f"pool.{k}": v for k, v in pool.state_dict().items()}
    tensors["pool_generator"] = pool.generator_state()
    tensors.update({f"student.{k}": v for k, v in result["student"].state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{state.process_index}.safetensors"))
''')


def _launch(tmp_path, *sets):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(tmp_path / "train.py"), str(tmp_path), *sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [load_file(str(tmp_path / f"rank{i}.safetensors")) for i in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("student", ["full", "lora"])
def test_two_processes_keep_bitwise_identical_pools(tmp_path, student):
    """And students: DDP averages a full student's gradients, or a LoRA student's adapter gradients only."""
    lora = ("student.kind=lora", "student.rank=4", "student_optim.lr=1e-3") if student == "lora" else ()
    r0, r1 = _launch(tmp_path, *lora)
    assert r0.keys() == r1.keys()
    different = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not different, different[:5]
    # and training did happen: 4 optimiser steps of 2 ranks x 4 micro-batches x 2 images (2 < 4 t*: some
    # heads get no gradient on one rank and some on the other; the collectives must still line up)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 and '"images": 64' in log[-1]


@pytest.mark.slow
def test_zero_sharded_student_optimiser_matches_the_replicated_one(tmp_path):
    plain, _ = _launch(tmp_path / "plain")
    z0, z1 = _launch(tmp_path / "zero", "student_optim.zero=true")
    for k in plain:  # ZeRO-1 changes where the AdamW state lives, not the arithmetic
        assert torch.equal(z0[k], z1[k]) and torch.equal(z0[k], plain[k]), k
    optim = torch.load(sorted((tmp_path / "zero" / "run" / "checkpoints").iterdir())[-1] / "optim.pt",
                       weights_only=True)
    n_params = sum(1 for k in plain if k.startswith("student."))
    assert len(optim["g"]["state"]) == n_params  # the checkpoint holds every rank's shard, consolidated


@pytest.mark.slow
def test_two_processes_resume_exactly(tmp_path):
    whole, _ = _launch(tmp_path / "whole")
    _launch(tmp_path / "cut", "max_images=32")  # stops after 2 of the 4 steps, with a checkpoint
    r0, r1 = _launch(tmp_path / "cut", "RESUME")
    for k in whole:  # every rank restored its own RNG streams, loader position, pool and optimiser state
        assert torch.equal(r0[k], whole[k]) and torch.equal(r1[k], whole[k]), k
