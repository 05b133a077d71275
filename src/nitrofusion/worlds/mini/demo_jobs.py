"""The demo's jobs that may run in the helper process (helper.py): each loads what it needs by path,
so it can be pickled into a spawned interpreter, and returns only numbers and the few images a grid
shows. Run in either process, a job gives the same result: every random draw is seeded by the job's
arguments (pair shards by shard, evaluations by `seed`)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ...data.pairs import generate_pairs
from ...distill_config import PairsConfig
from .adapter import MiniAdapter
from .data import class_prompts
from .evaluation import MiniEvaluation, per_class
from .metrics import MiniMetrics
from .pairsets import held_out_pairs
from .teacher import load_teacher

_loaded: dict = {}  # per process: the teacher's adapter and the metrics, loaded once for all its jobs


def world(teacher: str | None) -> tuple[MiniAdapter, MiniMetrics]:
    if _loaded.get("teacher", "unset") != teacher:
        _loaded.update(teacher=teacher, adapter=MiniAdapter(load_teacher(teacher)), metrics=MiniMetrics())
    return _loaded["adapter"], _loaded["metrics"]


def share_of_pairs(adapter: MiniAdapter, count: int, seed: int, out: str, shard_size: int, batch_size: int,
                   shards: list[int], progress: bool = False) -> None:
    """The given shards of a pair set (each present and intact one kept); no index file."""
    generate_pairs(adapter, class_prompts(), count, seed, out, shard_size=shard_size, batch_size=batch_size,
                   progress=progress, write_index=False, shards=shards)


def pair_shards(teacher: str | None, *args) -> None:
    """share_of_pairs in the helper (its teacher loaded once, by `warm_up` if that ran first)."""
    share_of_pairs(world(teacher)[0], *args)


def warm_up(teacher: str | None) -> None:
    """Imports and loads while the main process loads its own copy (a spawned interpreter takes seconds)."""
    world(teacher)


def teacher_rows(teacher: str | None, eval_samples: int, pairs: PairsConfig, seed: int) -> dict:
    """The held-out pair set (generated here when missing), then the teacher's and the teacher-at-one-step
    rows of the report, with the one-step row's grid images."""
    adapter, metrics = world(teacher)
    evaluation = MiniEvaluation(adapter, held_out_pairs(adapter, eval_samples, pairs, progress=False), metrics,
                                shift=0, seed=seed)
    one_step = evaluation.teacher_one_step_images()
    return {"teacher": {**evaluation.teacher(), "fid_to_teacher": 0.0},
            "teacher_one_step": evaluation.score(one_step, to_teacher=True),
            "grid": one_step[per_class(evaluation.labels)]}


def student_rows(teacher: str | None, student_unet: str, eval_samples: int, pairs: PairsConfig, shift: int,
                 seed: int, steps: list[int]) -> dict[int, dict]:
    """`score_student` for the student read from its saved fp32 folder (the very weights training ended with)."""
    adapter, metrics = world(teacher)
    unet = UNet2DConditionModel.from_pretrained(Path(student_unet), use_safetensors=True).eval()
    evaluation = MiniEvaluation(adapter, held_out_pairs(adapter, eval_samples, pairs, progress=False), metrics,
                                shift=shift, seed=seed)
    return score_student(evaluation, unet, steps)


def score_student(evaluation: MiniEvaluation, unet: torch.nn.Module, steps: list[int]) -> dict[int, dict]:
    """The student at each step count: {steps: {"scores": report row, "grid": the grid's images}}."""
    pick = per_class(evaluation.labels)
    out = {}
    for k in steps:
        images = evaluation.student_images(unet, k)
        out[k] = {"scores": evaluation.score(images, to_teacher=True), "grid": images[pick]}
    return out
