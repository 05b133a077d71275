"""Random-weight FLUX.1 pipelines for tests (no weights can be downloaded on our machines): FLUX.1-dev's layout in
miniature (CLIP-L's pooled embedding, a tiny T5 with a character-level tokenizer, a FluxTransformer2DModel with
double- and single-stream blocks, rotary position axes and a guidance embedder; a 16-channel VAE with FLUX's scaling
and shift; dev's flow-matching Euler scheduler with the resolution-dependent shift), or at FLUX.1-dev's full size with
random weights (`build_flux_pipeline("full")`: the bench, worlds/flux/bench.py; its memory model counts the same
configs on the meta device, worlds/flux/memory.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..pipelines.testing import (
    BOS,
    EOS,
    tiny_t5,  # the T5 in miniature every T5 family's tests share
    write_tokenizer,
)

# FLUX.1-dev's scheduler_config.json, and FLUX.1-schnell's (no shift, no dynamic shift)
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
# FLUX.1-dev's published configs: transformer/config.json (11.9B parameters: 19 double-stream blocks, 38 single-stream,
# 24 heads of 128), text_encoder/config.json (CLIP-L, CLIPTextModel: its pooled embedding alone is used),
# text_encoder_2/config.json (T5-XXL's encoder, 4.8B) and vae/config.json (the 16-channel VAE, no quant convs)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu")  # SD3.5's CLIP-L too
FLUX_T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0)  # T5 v1.1 XXL's encoder, SD3.5's too
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
_VAE = {"tiny": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=64),
        "full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024)}


def flux_transformer_config(layers: int = 3, single_layers: int = 2, guidance: bool = True) -> dict:
    """2 heads of 8 (rotary axes 2 + 2 + 4 = the head width), a 32-wide text stream, CLIP's 32-wide pooled input."""
    return dict(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
                axes_dims_rope=(2, 2, 4))


def build_flux_pipeline(size: str = "tiny", seed: int = 0, layers: int = 3, single_layers: int = 2, t5: bool = True,
                        schnell: bool = False, dtype: torch.dtype | None = None):
    """A FluxPipeline with random weights in memory: `tiny` (64 px images: 8x8 latents, a 4x4 token grid; `layers`
    double-stream and `single_layers` single-stream blocks) or `full` (FLUX.1-dev's architectures: the 11.9B
    transformer, CLIP-L, with `t5` T5-XXL's encoder, the VAE). `t5`: FluxPipeline needs one (without it the folder is
    not a complete FLUX pipeline). `schnell`: FLUX.1-schnell's kind (no guidance embedder, its scheduler without
    shifts); else dev's. Each part but the VAE is cast to `dtype` as soon as it is built (build the full size under
    `torch.device("cuda")`: in fp32 the transformer is 48 GB, T5-XXL 19 GB). The tokenizers are character-level (no
    vocabulary can be downloaded)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    ids = dict(vocab_size=49408 if size == "full" else len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
               pad_token_id=vocab[EOS], max_position_embeddings=77)
    clip_config = (FLUX_CLIP_L if size == "full" else
                   dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2))
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(**clip_config, **ids)).to(dtype)
    torch.manual_seed(seed + 1)
    config = FLUX_DEV if size == "full" else flux_transformer_config(layers, single_layers)
    transformer = FluxTransformer2DModel(**{**config, "guidance_embeds": not schnell}).to(dtype)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**FLUX_VAE, **_VAE[size])  # fp32, as adapters keep it
    tokenizer_2, text_encoder_2 = None, None
    if t5 and size == "full":
        from transformers import T5Config, T5EncoderModel

        tokenizer_2, _ = tiny_t5(seed + 3, 8)
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(T5Config(**FLUX_T5_XXL)).to(dtype)
    elif t5:
        tokenizer_2, text_encoder_2 = tiny_t5(seed + 3, 32)
    scheduler = FlowMatchEulerDiscreteScheduler(**(SCHNELL_SCHEDULER if schnell else DEV_SCHEDULER))
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=transformer)


def build_random_flux(folder: str | Path, seed: int = 0, layers: int = 3, single_layers: int = 2, t5: bool = True,
                      schnell: bool = False) -> Path:
    """Write a diffusers FluxPipeline folder with random weights (64 px images, `layers` double-stream and
    `single_layers` single-stream blocks; `schnell`: FLUX.1-schnell's kind)."""
    folder = Path(folder)
    build_flux_pipeline("tiny", seed, layers, single_layers, t5, schnell).save_pretrained(folder)
    return folder
