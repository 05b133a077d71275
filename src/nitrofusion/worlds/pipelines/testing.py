"""Random-weight pipelines for tests, the part every family shares: an offline character-level CLIP BPE tokenizer
(no merges) with the special-token ids the text-encoder configs point at (CLIPTextModel pools at eos_token_id).
No weights or tokenizers can be downloaded on our machines."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

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


def tiny_t5(seed: int, width: int):
    """(T5 tokenizer, T5 encoder): a character-level Unigram tokenizer (T5's special ids: pad 0, eos 1, unk 2) and
    a 2-layer encoder `width` wide, the joint attention width its states feed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in CHARS] + [("\u2581", -1.0)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    import torch

    torch.manual_seed(seed)
    encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=width, d_kv=8, d_ff=37, num_layers=2,
                                      num_heads=4, decoder_start_token_id=0))
    return tokenizer, encoder


def random_lora(net: torch.nn.Module, rank: int, alpha: float, targets: list[str], seed: int) -> tuple[dict, dict]:
    """Random non-zero LoRA factors on `targets` of `net`, put on as the trainer puts them (the loader checks use
    them): A ~ N(0, 1/in), B ~ N(0, 1), a large delta so that its effect is plain to see, the same draws for every
    alpha. Returns (the PEFT factors, their LoraConfig), what `save_lora_files` takes; `net` keeps the adapters."""
    from ...models.student import add_lora, lora_metadata, peft_factors

    add_lora(net, rank, alpha, 0.0, targets)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return peft_factors(net), lora_metadata(net)
