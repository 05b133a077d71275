"""Random-weight Stable Diffusion 3 pipelines for tests (no weights can be downloaded on our machines): the SD3
layout in miniature (two CLIP text encoders with projections; no T5, which SD3's pipeline allows, or a tiny T5 with
a character-level tokenizer; an MMDiT with 2x2 patches; a 16-channel VAE with SD3's scaling and shift; the
flow-matching Euler scheduler, shift 3)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..pipelines.testing import BOS, CHARS, EOS, write_tokenizer


def sd3_transformer_config(layers: int = 4) -> dict:
    return dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                pooled_projection_dim=64, pos_embed_max_size=32)


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
    torch.manual_seed(seed)
    encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=width, d_kv=8, d_ff=37, num_layers=2,
                                      num_heads=4, decoder_start_token_id=0))
    return tokenizer, encoder


def build_random_sd3(folder: str | Path, seed: int = 0, layers: int = 4, t5: bool = False) -> Path:
    """Write a diffusers StableDiffusion3Pipeline folder with random weights (64 px images, 8x8 patch grid); `t5`:
    with a tiny T5 as its third text encoder."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer(Path(tmp))
        tokenizers = [CLIPTokenizer.from_pretrained(tmp) for _ in range(2)]
    ids = dict(vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
               max_position_embeddings=77)
    encoders = []
    for i in range(2):  # CLIP-L and CLIP-G in miniature: 16 wide each, concatenated to the joint width 32
        torch.manual_seed(seed + i)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
            **ids)))
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(**sd3_transformer_config(layers))
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    tokenizer_3, text_encoder_3 = tiny_t5(seed + 4, 32) if t5 else (None, None)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder)
    if t5:
        return folder
    index_file = folder / "model_index.json"  # diffusers omits a None component; name it, so loading needs no kwargs
    index = json.loads(index_file.read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder
