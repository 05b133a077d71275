"""A run's teacher pairs (docs/method.md §4): online, or a cache generated (sharded over processes) and loaded.

Pair generation is sharded over the accelerate processes (shard s goes to process s mod N), so
`accelerate launch` fills a cache N times faster and every process then reads the same cache.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from accelerate import PartialState

from .adapters.base import ModelAdapter
from .distill_config import DistillConfig
from .dtypes import mixed_precision_dtype, torch_dtype
from .pairs import (
    OnlinePairs,
    Pairs,
    Prompts,
    ShardedPairs,
    drop_corrupt_shards,
    generate_pairs,
    load_pairs,
    pair_dir,
    write_index_file,
)


def use_cpu() -> bool:
    """accelerate only forms a multi-CPU (gloo) group when told `cpu`; on a machine without a GPU that is
    the only choice, so `accelerate launch --multi_gpu --num_processes N` (or torchrun) works there too."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def process_state() -> PartialState:
    return PartialState(cpu=use_cpu())


def training_data(cfg: DistillConfig, adapter: ModelAdapter, state: PartialState | None = None,
                  out: Path | None = None, load: bool = True,
                  prompts: Prompts | None = None) -> Pairs | ShardedPairs | OnlinePairs | Path:
    """The teacher pairs of a run: online, or a cache generated (sharded over processes) and loaded."""
    state = state or process_state()
    if prompts is None:
        from .worlds import world_of_config

        prompts = world_of_config(cfg).prompts(cfg, verbose=state.is_main_process)
    if cfg.pairs.online:
        return OnlinePairs(adapter, prompts, cfg.pairs.seed)
    p = cfg.pairs
    out = out or pair_dir(p.dir, adapter, prompts, p.count, p.seed, p.shard_size)
    if state.is_main_process:
        drop_corrupt_shards(out)
    state.wait_for_everyone()
    adapter.to(state.device)
    amp = mixed_precision_dtype(cfg.mixed_precision)
    ctx = torch.autocast(state.device.type, dtype=amp) if amp else contextlib.nullcontext()
    with ctx:
        generate_pairs(adapter, prompts, p.count, p.seed, out, shard_size=p.shard_size, batch_size=p.batch_size,
                       device=state.device, process_index=state.process_index, num_processes=state.num_processes,
                       progress=state.is_main_process, write_index=False, dtype=torch_dtype(p.dtype))
    state.wait_for_everyone()
    if state.is_main_process:
        write_index_file(out, p.count, p.seed, p.shard_size, adapter)
    state.wait_for_everyone()
    return load_pairs(out, in_memory=p.in_memory) if load else out
