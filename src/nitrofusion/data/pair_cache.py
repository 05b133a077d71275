"""A run's teacher pairs (docs/method.md §4): online, or a cache generated (sharded over processes) and loaded.

Pair generation is sharded over the accelerate processes (shard s goes to process s mod N), so
`accelerate launch` fills a cache N times faster and every process then reads the same cache. Runs that are not
one accelerate launch may share a cache too: each shard is made under its lock (data/pairs.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState

from ..distill_config import DistillConfig, PairsConfig
from ..dtypes import mixed_precision_dtype, torch_dtype, use_cpu
from ..method.adapter import ModelAdapter
from .pairs import (
    OnlinePairs,
    Pairs,
    Prompts,
    ShardedPairs,
    ShardSubset,
    drop_corrupt_shards,
    generate_pairs,
    load_pairs,
    pair_dir,
    read_index,
    shard_name,
    shards_read,
    write_index_file,
)
from .text_cache import TextCache


def process_state() -> PartialState:
    return PartialState(cpu=use_cpu())


class _OneCPUProcess:
    """The part of accelerate's PartialState that teacher_pairs reads, for one process on the CPU."""

    device = torch.device("cpu")
    is_main_process = True
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass


def training_data(cfg: DistillConfig, adapter: ModelAdapter, prompts: Prompts, state: PartialState | None = None,
                  out: Path | None = None,
                  load: bool = True) -> Pairs | ShardedPairs | ShardSubset | OnlinePairs | Path:
    """The teacher pairs of a run (its world's `prompts`): online, or the cache (`teacher_pairs`), as many as the
    run reads."""
    state = state or process_state()
    if cfg.pairs.online:
        return OnlinePairs(adapter, prompts, cfg.pairs.seed, mixed_precision_dtype(cfg.mixed_precision))
    shards = shards_read(cfg, state.num_processes)
    if shards is not None and state.is_main_process:
        print(f"teacher pairs: making {len(shards):,} of the {cfg.pairs.shards:,} shards of pairs.count="
              f"{cfg.pairs.count:,}, those max_images={cfg.max_images:,} reads (a longer run adds the rest)")
    return teacher_pairs(adapter, prompts, cfg.pairs, cfg.pairs.count, cfg.pairs.seed, out, state,
                         mixed_precision_dtype(cfg.mixed_precision), load, shards=shards)


def teacher_pairs(adapter: ModelAdapter, prompts: Prompts, p: PairsConfig, count: int, seed: int,
                  out: Path | None = None, state: PartialState | None = None, amp: torch.dtype | None = None,
                  load: bool = True, progress: bool = True,
                  shards: list[int] | None = None) -> Pairs | ShardedPairs | ShardSubset | Path:
    """The one path to a pair cache, for every caller (a run, the held-out sets of the demo, `evaluate` and
    `ablate`): corrupt shards dropped, what is missing generated (shard s by process s mod N, the teacher under
    autocast `amp`), indexed, then loaded (or its folder returned when `load` is false). `shards`: only these
    shards of the set (`shards_read`). `out` defaults to the shared cache keyed by teacher, sampler,
    prompts, count, seed, shard size and precision (`p.dir` names a folder instead). Without `state`: this
    process alone, on the CPU (the mini world's single-process callers)."""
    state = state or _OneCPUProcess()
    storage = torch_dtype(p.dtype)
    out = out or pair_dir(p.dir, adapter, prompts, count, seed, p.shard_size, storage, amp)
    # each shard file is hashed once here: the digests computed (`verified`) are handed on, never recomputed
    verified = drop_corrupt_shards(out) if state.is_main_process else {}
    state.wait_for_everyone()
    adapter.to(state.device)
    wanted = range(-(-count // p.shard_size)) if shards is None else shards
    mine = [s for s in wanted if s % state.num_processes == state.process_index]
    generate_pairs(adapter, prompts, count, seed, out, shard_size=p.shard_size, batch_size=p.batch_size,
                   device=state.device, progress=progress and state.is_main_process, write_index=False,
                   dtype=storage, shards=mine, amp=amp, verified=verified)
    state.wait_for_everyone()
    if state.is_main_process:
        write_index_file(out, count, seed, p.shard_size, adapter, verified)
    state.wait_for_everyone()
    if not load:
        return out
    pairs = load_pairs(out, in_memory=p.in_memory, shards=shards, verified=verified)
    attach_text_cache(adapter, out, shards)
    return pairs


def attach_text_cache(adapter: ModelAdapter, out: Path, shards: list[int] | None) -> None:
    """The pair set's cached prompt states (data/text_cache.py) as the adapter's `text_cache`, if it stores any:
    read instead of their encoder once it is released (`ModelAdapter.release_cached_encoders`)."""
    if adapter.cached_text_names():
        indexed = sorted(read_index(out)["shards"]) if shards is None else [shard_name(s) for s in shards]
        adapter.text_cache = TextCache([out / name for name in indexed], list(adapter.cached_text_names()))
