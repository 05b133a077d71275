"""From a DistillConfig to what the trainer needs: the model adapter of its world and its teacher pairs.

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
from .errors import NitroFusionError
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

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def use_cpu() -> bool:
    """accelerate only forms a multi-CPU (gloo) group when told `cpu`; on a machine without a GPU that is
    the only choice, so `accelerate launch --multi_gpu --num_processes N` (or torchrun) works there too."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def process_state() -> PartialState:
    return PartialState(cpu=use_cpu())


def load_adapter(cfg: DistillConfig) -> ModelAdapter:
    if cfg.world == "mini":
        from .adapters.mini import MiniAdapter
        from .mini.teacher import load_teacher

        return MiniAdapter(load_teacher(cfg.teacher or None))
    from .adapters.sdxl import SDXLAdapter

    if not cfg.teacher:
        raise NitroFusionError("world 'sdxl' needs a teacher: --teacher DIR (a diffusers SDXL pipeline folder)")
    return SDXLAdapter(cfg.teacher, cfg.sdxl)


def prompt_source(cfg: DistillConfig, verbose: bool = True) -> Prompts:
    if cfg.world == "mini":
        from .mini.data import class_prompts

        return class_prompts()
    from .prompts import open_prompts

    if not cfg.prompts.source:
        raise NitroFusionError("world 'sdxl' needs prompts: --prompts FILE (.txt, .csv, .jsonl, a datasets "
                               "folder or hf:NAME)")
    source = open_prompts(cfg.prompts.source, cfg.prompts.column, cfg.prompts.split, cfg.prompts.max_chars)
    source.count()  # one streamed pass: fails now on an unusable source, and counts what was skipped
    if verbose:
        print(f"prompts: {source.stats.summary()} from {cfg.prompts.source}")
    return source


def training_data(cfg: DistillConfig, adapter: ModelAdapter, state: PartialState | None = None,
                  out: Path | None = None, load: bool = True,
                  prompts: Prompts | None = None) -> Pairs | ShardedPairs | OnlinePairs | Path:
    """The teacher pairs of a run: online, or a cache generated (sharded over processes) and loaded."""
    state = state or process_state()
    prompts = prompts if prompts is not None else prompt_source(cfg, verbose=state.is_main_process)
    if cfg.pairs.online:
        return OnlinePairs(adapter, prompts, cfg.pairs.seed)
    p = cfg.pairs
    out = out or pair_dir(p.dir, adapter, prompts, p.count, p.seed, p.shard_size)
    if state.is_main_process:
        drop_corrupt_shards(out)
    state.wait_for_everyone()
    adapter.to(state.device)
    amp = AUTOCAST.get(cfg.mixed_precision)
    ctx = torch.autocast(state.device.type, dtype=amp) if amp else contextlib.nullcontext()
    with ctx:
        generate_pairs(adapter, prompts, p.count, p.seed, out, shard_size=p.shard_size, batch_size=p.batch_size,
                       device=state.device, process_index=state.process_index, num_processes=state.num_processes,
                       progress=state.is_main_process, write_index=False, dtype=DTYPES[p.dtype])
    state.wait_for_everyone()
    if state.is_main_process:
        write_index_file(out, p.count, p.seed, p.shard_size, adapter)
    state.wait_for_everyone()
    return load_pairs(out, in_memory=p.in_memory) if load else out
