"""Random-weight Stable Diffusion 1.x / 2.x pipelines for tests (no weights can be downloaded on our machines).

`build_random_sd(folder, "sd1")`: the SD 1.x layout in miniature (CLIP text encoder, attention in every block but
the last, convolutional projections, epsilon prediction, PNDM scheduler as the released folders ship);
`"sd2"`: the 2.x-v layout (linear projections, v-prediction, DDIM scheduler). Tokenizers are the offline
character-level CLIP vocabulary of worlds/sdxl/testing.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import torch

from ..pipelines.testing import BOS, EOS, write_tokenizer

Variant = Literal["sd1", "sd2"]


def sd_unet_config(variant: Variant = "sd1") -> dict:
    return dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, cross_attention_dim=32,
                use_linear_projection=variant == "sd2")


def build_random_sd(folder: str | Path, variant: Variant = "sd1", seed: int = 0) -> Path:
    """Write a diffusers StableDiffusionPipeline folder with random weights (64 px images, 32x32 latents)."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=len(vocab), bos_token_id=vocab[BOS],
                                        eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], max_position_embeddings=77))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**sd_unet_config(variant))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64, scaling_factor=0.18215)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if variant == "sd2":
        scheduler = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**betas, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
