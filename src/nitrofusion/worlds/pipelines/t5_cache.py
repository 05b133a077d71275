"""The T5 half of a T5 family's adapter (SD3, FLUX; docs/method.md §8): T5's states of every pair's prompt are
cached with the teacher pairs (data/text_cache.py), and a training run releases T5 and reads them instead. A family
gives `t5_attribute` (where its pipeline keeps T5), `_encode_live` (its pipeline's `encode_prompt`) and
`_encode_with_cached_t5` (the same composition with T5's states from `text_cache`, bit for bit)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from ...method.adapter import Cond


@contextlib.contextmanager
def quiet_truncation(pipe) -> Iterator[None]:
    """Without the pipeline's warning for every batch whose prompts pass max_sequence_length T5 tokens (or CLIP's
    77): cutting them is the configured behaviour, and a pair set repeats it a million times."""
    logger = logging.getLogger(type(pipe).__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class CachedT5:
    """Mixed into a family's adapter before ModelAdapter; reads `self.pipe`, `self.cfg` (t5_cache,
    max_sequence_length), `self.device` and `self.text_cache`."""

    t5_attribute: str
    t5_released = False  # T5 freed for a training run; its states come from the pairs

    def _encode_live(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def _encode_with_cached_t5(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        if self.t5_released:
            return self._encode_with_cached_t5(prompts)
        with quiet_truncation(self.pipe):
            return self._encode_live(prompts)

    def cached_states(self, prompts: list[str]) -> torch.Tensor:
        """T5's states of the prompts, from the pairs' cache, on the adapter's device."""
        return self.text_cache.states(prompts, "t5").to(self.device)

    def cached_text_names(self) -> tuple[str, ...]:
        """T5's states, when the run caches them and the pipeline has a T5 (SD3's may have none: zeros then)."""
        present = self.t5_released or getattr(self.pipe, self.t5_attribute) is not None
        return ("t5",) if self.cfg.t5_cache and present else ()

    @torch.no_grad()
    def cacheable_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if not self.cached_text_names() or self.t5_released:
            return {}
        with quiet_truncation(self.pipe):
            return {"t5": self.pipe._get_t5_prompt_embeds(prompt=prompts, device=self.device,
                                                          max_sequence_length=self.cfg.max_sequence_length)}

    def text_cache_tag(self) -> str:
        return f"t5-{self.cfg.max_sequence_length}" if self.cached_text_names() else ""

    def release_cached_encoders(self) -> int:
        """T5 goes; its states come from the teacher pairs' cache. The empty prompt (the null condition) is encoded
        first, while T5 is here."""
        if self.t5_released or self.text_cache is None or not self.cached_text_names():
            return 0
        self._empty_cond()
        t5 = getattr(self.pipe, self.t5_attribute)
        freed = sum(t.numel() * t.element_size() for t in (*t5.parameters(), *t5.buffers()))  # tied ones once
        setattr(self.pipe, self.t5_attribute, None)
        self.t5_released = True
        del t5
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def _empty_cond(self) -> Cond:
        """The empty prompt's encoding, on the device it is used on (kept as is once T5 is released)."""
        empty = getattr(self, "_empty", None)
        if empty is None or empty["prompt_embeds"].device != self.device and not self.t5_released:
            empty = self._empty = self.encode_prompts([""])
        return empty

    def null_cond(self, cond: Cond) -> Cond:
        """The empty prompt's encoding for every row (what E's unconditional task and CFG use)."""
        empty = self._empty_cond()
        n = cond["prompt_embeds"].shape[0]
        return {k: v.to(cond[k]).repeat(n, *([1] * (v.ndim - 1))) for k, v in empty.items()}
