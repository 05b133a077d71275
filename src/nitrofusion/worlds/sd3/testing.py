"""Random-weight Stable Diffusion 3 pipelines for tests (no weights can be downloaded on our machines): the SD3
layout in miniature (two CLIP text encoders with projections; no T5, which SD3's pipeline allows, or a tiny T5 with
a character-level tokenizer; an MMDiT with 2x2 patches; a 16-channel VAE with SD3's scaling and shift; the
flow-matching Euler scheduler, shift 3)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..pipelines.testing import BOS, EOS, tiny_t5, write_tokenizer


def sd3_transformer_config(layers: int = 4) -> dict:
    return dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                pooled_projection_dim=64, pos_embed_max_size=32)


# SD3.5 medium's architectures (its published configs): the MMDiT-X (24 joint blocks of 24 x 64 heads, the first 13
# with a second self-attention on the image tokens, RMS-normed q/k), CLIP-L and OpenCLIP bigG with projections, T5-XXL
# v1.1's encoder and the 16-channel VAE
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", decoder_start_token_id=0)
_VAE = {"tiny": dict(layers_per_block=1, block_out_channels=(32, 32, 32, 32), sample_size=64),
        "full": dict(layers_per_block=2, block_out_channels=(128, 256, 512, 512), sample_size=1024)}
_CLIP = {"tiny": [dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                       projection_dim=32)] * 2, "full": [CLIP_L, CLIP_G]}


def build_sd3_pipeline(size: str = "tiny", seed: int = 0, layers: int = 4, t5: bool = False,
                       dtype: torch.dtype | None = None):
    """A StableDiffusion3Pipeline with random weights in memory: `tiny` (64 px images, an 8x8 patch grid; `layers`
    blocks) or `full` (SD3.5 medium's architectures; with `t5`, T5-XXL's encoder: 4.8B parameters). Each part but the
    VAE is cast to `dtype` as soon as it is built. The tokenizers are character-level (no vocabulary can be
    downloaded)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer(Path(tmp))
        tokenizers = [CLIPTokenizer.from_pretrained(tmp) for _ in range(2)]
    ids = dict(vocab_size=49408 if size == "full" else len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
               pad_token_id=vocab[EOS], max_position_embeddings=77)
    encoders = []
    for i in range(2):  # CLIP-L and CLIP-G (tiny: 16 wide each, concatenated to the joint width 32)
        torch.manual_seed(seed + i)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**_CLIP[size][i], **ids)).to(dtype))
    torch.manual_seed(seed + 2)
    config = SD35_MEDIUM if size == "full" else sd3_transformer_config(layers)
    transformer = SD3Transformer2DModel(**config).to(dtype)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False, **_VAE[size])  # fp32, as adapters keep it
    tokenizer_3, text_encoder_3 = None, None
    if t5 and size == "full":
        from transformers import T5Config, T5EncoderModel

        tokenizer_3, _ = tiny_t5(seed + 4, 8)
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(**T5_XXL)).to(dtype)
    elif t5:
        tokenizer_3, text_encoder_3 = tiny_t5(seed + 4, 32)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
                                    text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def build_random_sd3(folder: str | Path, seed: int = 0, layers: int = 4, t5: bool = False) -> Path:
    """Write a diffusers StableDiffusion3Pipeline folder with random weights (64 px images, 8x8 patch grid); `t5`:
    with a tiny T5 as its third text encoder."""
    folder = Path(folder)
    pipe = build_sd3_pipeline("tiny", seed, layers, t5)
    pipe.save_pretrained(folder)
    if t5:
        return folder
    index_file = folder / "model_index.json"  # diffusers omits a None component; name it, so loading needs no kwargs
    index = json.loads(index_file.read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder
