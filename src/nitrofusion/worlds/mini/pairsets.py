"""The mini world's two teacher-pair sets, in one place: the training set a preset reads, and the
held-out set (pair seed + EVAL_SEED_OFFSET) that the demo and `nitrofusion evaluate` both score on."""

from __future__ import annotations

from pathlib import Path

from ...data.pairs import Pairs
from ...data.pairs import pair_dir as _pair_dir
from ...distill_config import DistillConfig, PairsConfig
from .adapter import MiniAdapter
from .data import class_prompts

EVAL_SEED_OFFSET = 1_000_003


def pair_dir(root: str, adapter: MiniAdapter, count: int, seed: int, shard_size: int = 1000) -> Path:
    """`root`/count-seed when a folder is configured, else the shared cache keyed by teacher and sampler."""
    return _pair_dir(root, adapter, class_prompts(), count, seed, shard_size)


def _pairs(adapter: MiniAdapter, cfg: PairsConfig, count: int, seed: int, out: Path | None,
           progress: bool) -> Pairs:
    from ...data.pair_cache import teacher_pairs

    return teacher_pairs(adapter, class_prompts(), cfg, count, seed, out, progress=progress)


def training_pairs(cfg: DistillConfig, adapter: MiniAdapter, out: Path | None = None,
                   progress: bool = True) -> Pairs:
    return _pairs(adapter, cfg.pairs, cfg.pairs.count, cfg.pairs.seed, out, progress)


def held_out_pairs(adapter: MiniAdapter, count: int, pairs_cfg: PairsConfig | None = None,
                   progress: bool = True) -> Pairs:
    cfg = pairs_cfg or PairsConfig()
    return _pairs(adapter, cfg, count, cfg.seed + EVAL_SEED_OFFSET, None, progress)
