"""Prompt states cached with the teacher pairs (docs/method.md §8): a family whose text encoder is large (SD3's
T5-XXL, 4.8B parameters) stores that encoder's output for every pair's prompt in the pair's shard (`text.<name>`
tensors, rows aligned with the shard's prompts, in the encoder's own dtype so nothing is rounded). A run whose every
prompt comes from those shards then reads the states instead of running the encoder, and releases it before training
(`ModelAdapter.release_cached_encoders`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import NitroFusionError

PREFIX = "text."  # a shard's tensors of cached prompt states: text.<name>


class TextCache:
    """Prompt -> its cached states, read row by row from the memory-mapped shards (no RAM for a million prompts)."""

    def __init__(self, paths: list[Path], names: list[str]) -> None:
        self.names = list(names)
        self._files = [safe_open(str(p), framework="pt") for p in paths]
        self._where: dict[str, tuple[int, int]] = {}
        for i, (path, f) in enumerate(zip(paths, self._files, strict=True)):
            missing = [n for n in self.names if PREFIX + n not in set(f.keys())]
            if missing:
                raise NitroFusionError(f"teacher-pair shard {path} holds no cached prompt states {missing} (made "
                                       "before they were cached, or with the cache off); delete its folder to remake "
                                       "the pairs, or turn the cache off (sd3.t5_cache=false)")
            for row, prompt in enumerate(json.loads(f.metadata()["prompts"])):
                self._where.setdefault(prompt, (i, row))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._where

    def states(self, prompts: list[str], name: str) -> torch.Tensor:
        """[B, ...] states `name` of the prompts, as the encoder gave them."""
        rows = []
        for p in prompts:
            if p not in self._where:
                raise NitroFusionError(f"prompt {p[:60]!r} is not among the teacher pairs' cached prompts; every "
                                       "prompt of a run that released its text encoder must come from its pairs")
            i, r = self._where[p]
            rows.append(self._files[i].get_slice(PREFIX + name)[r:r + 1])
        return torch.cat(rows)
