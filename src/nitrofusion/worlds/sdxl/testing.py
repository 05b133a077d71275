"""Random-weight SDXL pipelines, built locally: no weights can be downloaded on our machines.

`build_random_sdxl(folder, "tiny")` writes a seconds-to-load diffusers SDXL folder for tests;
`"full"` uses the real SDXL architecture (2.6B-parameter UNet, both CLIP encoders, the VAE) for
benchmarks, where timing and memory do not depend on the weights. The tokenizers are offline
(worlds/pipelines/testing.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from ..pipelines.testing import BOS, EOS, write_tokenizer

Size = Literal["tiny", "full"]

_UNET = {
    "tiny": dict(sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=2,
                 transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
    "full": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=1280 + 6 * 256),
}
_TEXT = {  # (CLIP ViT-L, OpenCLIP bigG) for full
    "tiny": (dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
             dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=32)),
    "full": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu"),
             dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")),
}
_VAE = {
    "tiny": dict(block_out_channels=(32, 64), sample_size=64),
    "full": dict(block_out_channels=(128, 256, 512, 512), sample_size=1024),
}


def sdxl_unet_config(size: Size = "tiny") -> dict:
    return dict(in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                 "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                use_linear_projection=True, addition_embed_type="text_time", **_UNET[size])


def build_sdxl_unet(size: Size = "tiny", seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**sdxl_unet_config(size))


def build_sdxl_components(size: Size = "tiny", seed: int = 0, text: bool = True,
                          dtype: torch.dtype | None = None) -> dict:
    """Random-weight SDXL parts in memory: tokenizers, text_encoders (empty lists when text=False),
    unet, vae, scheduler (SDXL's own scheduler config). Each part is cast to `dtype` as soon as it is built,
    so a full-size fp16 build peaks near one fp32 UNet (10 GB), not the whole fp32 pipeline."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    parts: dict = {"tokenizers": [], "text_encoders": []}
    if text:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            vocab = write_tokenizer(Path(tmp))
            parts["tokenizers"] = [CLIPTokenizer.from_pretrained(tmp) for _ in range(2)]
        ids = dict(vocab_size=49408 if size == "full" else len(vocab), bos_token_id=vocab[BOS],
                   eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], max_position_embeddings=77)
        cfg1, cfg2 = _TEXT[size]
        torch.manual_seed(seed)
        parts["text_encoders"] = [CLIPTextModel(CLIPTextConfig(**cfg1, **ids)).to(dtype),
                                  CLIPTextModelWithProjection(CLIPTextConfig(**cfg2, **ids)).to(dtype)]
    parts["unet"] = build_sdxl_unet(size, seed + 1).to(dtype)
    torch.manual_seed(seed + 2)
    blocks = len(_VAE[size]["block_out_channels"])
    parts["vae"] = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                 down_block_types=("DownEncoderBlock2D",) * blocks,
                                 up_block_types=("UpDecoderBlock2D",) * blocks, scaling_factor=0.13025,
                                 force_upcast=True, **_VAE[size]).to(dtype)
    parts["scheduler"] = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    return parts


def build_random_sdxl(folder: str | Path, size: Size = "tiny", seed: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers StableDiffusionXL folder with random weights (SDXL's scheduler config); `dtype`
    (e.g. float16) halves a full-size folder on disk."""
    folder = Path(folder)
    parts = build_sdxl_components(size, seed, dtype=dtype)
    for name, tok in zip(("tokenizer", "tokenizer_2"), parts["tokenizers"], strict=True):
        tok.save_pretrained(folder / name)
    for name, enc in zip(("text_encoder", "text_encoder_2"), parts["text_encoders"], strict=True):
        enc.save_pretrained(folder / name)
    for name in ("unet", "vae", "scheduler"):
        parts[name].save_pretrained(folder / name)
    parts = {"scheduler": ["diffusers", "EulerDiscreteScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "feature_extractor": [None, None], "image_encoder": [None, None]}
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True, **parts}, indent=2))
    return folder
