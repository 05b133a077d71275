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
    from nitrofusion.train import distill
    from nitrofusion.worlds import load_adapter, process_state, training_data

    out = Path(sys.argv[1])
    cfg = config.build(DistillConfig, "distill", "tiny", ["max_images=64", "pool.refresh_fraction=0.05",
                                                         "micro_batch=2", "grad_accum=4"])
    state = process_state()
    adapter = load_adapter(cfg)
    result = distill(cfg, adapter, training_data(cfg, adapter, state), out / "run", progress=False)
    pool = result["pool"]
    tensors = {f"pool.{k}": v for k, v in pool.state_dict().items()}
    tensors["pool_generator"] = pool.generator_state()
    tensors.update({f"student.{k}": v for k, v in result["student"].state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{state.process_index}.safetensors"))
''')


@pytest.mark.slow
def test_two_processes_keep_bitwise_identical_pools(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(tmp_path / "train.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / f"rank{i}.safetensors")) for i in (0, 1))
    assert r0.keys() == r1.keys()
    different = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not different, different[:5]
    # and training did happen: 4 optimiser steps of 2 ranks x 4 micro-batches x 2 images (2 < 4 t*: some
    # heads get no gradient on one rank and some on the other; the collectives must still line up)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4 and '"images": 64' in log[-1]
