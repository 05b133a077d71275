"""Random-weight Stable Diffusion 1.x / 2.x pipelines for tests (no weights can be downloaded on our machines).

`build_random_sd(folder, "sd1")`: the SD 1.x layout in miniature (CLIP text encoder, attention in every block but
the last, convolutional projections, epsilon prediction, PNDM scheduler as the released folders ship);
`"sd2"`: the 2.x-v layout (linear projections, v-prediction, DDIM scheduler). Tokenizers are the offline
character-level CLIP vocabulary of worlds/sdxl/testing.py. `size="full"` builds the real architectures (SD 1.5:
an 860M-parameter UNet and CLIP ViT-L; SD 2.1-v: the 865M-parameter linear-projection UNet and OpenCLIP ViT-H's first 23
layers, as the released diffusers folders ship it; both with 49,408-token embeddings and the 4-level VAE) for checks of
the files other tools load (scripts/check_sdcpp.py, scripts/check_comfyui.py), where the weights' values do not matter.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import torch

from ..pipelines.testing import BOS, EOS, write_tokenizer

Variant = Literal["sd1", "sd2"]
Size = Literal["tiny", "full"]

_FULL_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
_FULL = {  # (UNet, text encoder) per variant
    "sd1": (dict(sample_size=64, attention_head_dim=8, cross_attention_dim=768),
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu")),
    "sd2": (dict(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 use_linear_projection=True),
            dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu", projection_dim=512)),
}


def sd_unet_config(variant: Variant = "sd1", size: Size = "tiny") -> dict:
    if size == "full":
        return {**_FULL_UNET, **_FULL[variant][0]}
    return dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, cross_attention_dim=32,
                use_linear_projection=variant == "sd2")


def build_random_sd(folder: str | Path, variant: Variant = "sd1", seed: int = 0, size: Size = "tiny",
                    dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers StableDiffusionPipeline folder with random weights (tiny: 64 px images, 32x32 latents; full:
    SD 1.5's shapes). `dtype` (e.g. float16) is the precision on disk."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    full = size == "full"
    shape = ({**_FULL[variant][1], "vocab_size": 49408} if full else
             dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=len(vocab)))
    text = CLIPTextModel(CLIPTextConfig(**shape, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                                        pad_token_id=vocab[EOS], max_position_embeddings=77))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**sd_unet_config(variant, size))
    torch.manual_seed(seed + 2)
    levels = (128, 256, 512, 512) if full else (32, 64)
    image_size = {"sd1": 512, "sd2": 768}[variant] if full else 64
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2 if full else 1,
                        block_out_channels=levels, down_block_types=("DownEncoderBlock2D",) * len(levels),
                        up_block_types=("UpDecoderBlock2D",) * len(levels), sample_size=image_size,
                        scaling_factor=0.18215)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if variant == "sd2":
        scheduler = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction")
    else:
        scheduler = PNDMScheduler(**betas, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(folder)
    return folder
