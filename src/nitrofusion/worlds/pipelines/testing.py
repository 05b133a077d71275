"""Random-weight pipelines for tests, the part every family shares: an offline character-level CLIP BPE tokenizer
(no merges) with the special-token ids the text-encoder configs point at (CLIPTextModel pools at eos_token_id).
No weights or tokenizers can be downloaded on our machines."""

from __future__ import annotations

import json
import string
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARS = string.ascii_lowercase + string.digits + string.punctuation  # the tokenizers' alphabet


def write_tokenizer(folder: Path) -> dict[str, int]:
    """A character-level CLIP BPE tokenizer (no merges); returns its vocabulary."""
    vocab = {tok: i for i, tok in enumerate([*CHARS, *(c + "</w>" for c in CHARS), BOS, EOS])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return vocab
