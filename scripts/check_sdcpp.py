"""Does stable-diffusion.cpp load and sample what `nitrofusion export` writes? A manual check, not part of CI (the
binding builds from source in about 10 minutes; a full-size model takes minutes per family on a CPU).

    python -m venv sdcpp-venv && sdcpp-venv/bin/pip install stable-diffusion-cpp-python==0.4.7
    python scripts/check_sdcpp.py --python sdcpp-venv/bin/python --work /tmp/sdcpp-check --family sdxl sd15

Per family:
1. builds a random-weight model of the real architecture (fp16 on disk) and exports it with
   `export --format single-file --dtype float16`; for SDXL also random rank-4 LoRA factors written by the writer of
   `export --format lora` (the kohya file; as scripts/check_comfyui.py);
2. stable-diffusion.cpp (scripts/sdcpp_probe.py, run with the binding's Python) samples 256 x 256 from the single
   file: `sample_method="lcm"`, CFG 1, the Philox ("cuda") generator, `timestep_shift=S`, and custom sigmas at our
   1-4 step grid {999, 749, 499, 249} (sd.cpp's own `lcm` scheduler spaces 4 steps over 50, 999/759/499/259); 1 and
   4 steps, with the weights as stored (f16) and converted to f32; the kohya LoRA at 1 step;
3. our side loads the same single file as `nitrofusion generate` does, in fp32, and draws x_T and every re-noise
   from a port of sd.cpp's Philox generator, so both sides sample from the same noise. Two references:
   - "ours": our sampler as shipped (the authors' rule t' = floor(t S / 1000), x_T at unit variance);
   - "ours, sd.cpp's conventions": t' = round(t S / 1000) and x_T scaled by sigma / sqrt(1 + sigma^2), the two
     places where sd.cpp's sampler differs from the authors' scheduler by construction;
4. compares the 8-bit images, writes WORK/report.json, prints a table, exits 1 if a required check fails.

The prompt is empty: the random-weight encoders come with an offline tokenizer while sd.cpp tokenizes with CLIP's
BPE, and "" is [BOS, EOS] in both, so both sides encode the same token ids (CLIP-L padded with EOS, OpenCLIP-G with
0, as sd.cpp and diffusers' SDXL tokenizers pad). sd.cpp applies the timestep shift to SDXL only (it warns and
samples unshifted otherwise), so an SD 1.5 file is compared unshifted, and the error of sampling a shift-250
student that way is reported.

`--family sd3` (`--threads 1` keeps it under ~11 GB peak, about 10 minutes): sd.cpp builds SD3's MMDiT at depth
max(24, blocks in the file) and width 64 x depth, with full-size CLIP-L / CLIP-G / VAE, so the model is random
weights of SD3 Medium's shape (no T5: sd.cpp then uses 77 zero tokens, and so does our side), exported with
`--shift 1000` and sampled unshifted on both sides: sd.cpp's flow denoiser feeds t = 1000 sigma, its `lcm`
re-noises to (1 - sigma) x0 + sigma n, custom sigmas t / 1000. sd.cpp runs with the weights as stored (f16 only:
f32 would be 8 GB for the MMDiT); our side loads the file in fp16 and computes in fp32 (fp32_on_the_fly).
`--family sd35` does the same for SD3.5 Medium's shape (MMDiT-X, SD35_MEDIUM of nitrofusion.worlds.sd3.testing:
`attn2` in blocks 0-12, RMS q/k norms with weights drawn from U(0.5, 1.5), pos_embed_max_size 384): sd.cpp makes the
blocks up to the last one with `attn2` keys MMDiT-X, takes RMS norms from bias-less `attn.ln_*` keys and then
doubles its position grid to 384 (mmdit.hpp, `MMDiT::MMDiT`). About 8 minutes with `--threads 1`; peak resident
13.2 GB while our side loads the file (7 GB of it anonymous, the rest the file's mapped pages), sd.cpp 7.6 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIZE = 256  # 32 x 32 latents: every block runs, minutes not hours on a CPU
SEED = 42
BOS, EOS = 49406, 49407  # CLIP's ids, which sd.cpp's tokenizer uses
GRID = (999, 749, 499, 249)  # the student's 1-4 step grid (LCM's with original_inference_steps=4)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- sd.cpp's noise -----------------------------------------------------------------------------------------------

def philox_randn(seed: int, offset: int, n: int) -> np.ndarray:
    """The n normals sd.cpp's "cuda" generator returns for (seed, offset): Philox-4x32 with 10 rounds on the counter
    (offset, 0, i, 0) and key (seed low, seed high) for element i, then one float32 Box-Muller sine of the first two
    words. sd.cpp draws x_T at offset 0 and the sampler's k-th re-noise at offset k (one generator, seeded once)."""
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    w0, w1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
    c0, c1 = np.full(n, offset, np.uint32), np.zeros(n, np.uint32)
    c2, c3 = np.arange(n, dtype=np.uint32), np.zeros(n, np.uint32)
    k0 = np.full(n, seed & 0xFFFFFFFF, np.uint32)
    k1 = np.full(n, (seed >> 32) & 0xFFFFFFFF, np.uint32)
    with np.errstate(over="ignore"):
        for r in range(10):
            p0, p2 = c0.astype(np.uint64) * m0, c2.astype(np.uint64) * m1
            c0, c1, c2, c3 = ((p2 >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0, p2.astype(np.uint32),
                              (p0 >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1, p0.astype(np.uint32))
            if r < 9:
                k0, k1 = k0 + w0, k1 + w1
    step = np.float32(2.3283064e-10)
    step_2pi = step * np.float32(6.2831855)
    u = c0.astype(np.float32) * step + step / np.float32(2)
    v = c1.astype(np.float32) * step_2pi + step_2pi / np.float32(2)
    return np.sqrt(np.float32(-2.0) * np.log(u)) * np.sin(v)


def sdcpp_noise(offset: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(philox_randn(SEED, offset, int(np.prod(shape))).reshape(shape).copy())


# ---- the models ----------------------------------------------------------------------------------------------------

def build(family: str, work: Path, shift: int, rank: int) -> dict[str, Path]:
    from nitrofusion.worlds.pipelines.export import export

    if family in SD3_FAMILIES:
        return build_sd3(work, family)
    if family == "sdxl":
        from check_comfyui import build_models  # the same random SDXL, single file and LoRA as the ComfyUI check

        return build_models(work, shift, rank)
    from nitrofusion.worlds.sd.testing import build_random_sd

    paths = {"base": work / "base", "single": work / "model.safetensors"}
    if not paths["base"].exists():
        log("building a random full-size SD 1.5 (fp16 on disk)")
        build_random_sd(paths["base"], "sd1", seed=0, size="full", dtype=torch.float16)
    if not paths["single"].exists():
        log("export --format single-file --dtype float16")
        export(paths["base"], "single-file", paths["single"], shift=shift, dtype=torch.float16)
    return paths


def sigmas(alphas_cumprod: torch.Tensor, steps: int) -> str:
    """sd.cpp's custom sigma list for our grid: sigma_t = sqrt((1 - abar_t) / abar_t), then 0."""
    grid = GRID[:: 4 // steps] if steps in (1, 2, 4) else GRID[:steps]
    a = alphas_cumprod[list(grid)].double()
    return ",".join(f"{s:.9g}" for s in ((1 - a) / a).sqrt().tolist()) + ",0"


# ---- our side ------------------------------------------------------------------------------------------------------

def _ggml_table(fn):
    """ggml's CPU GELU / quick-GELU: the input rounded to fp16, looked up in an fp16 table of the function (the
    tanh form of GELU), beyond |x| >= 10 the limits."""
    def act(x: torch.Tensor, *_, **__) -> torch.Tensor:
        y = fn(x.half().float()).half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))
    return act


@contextlib.contextmanager
def ggml_activations():
    """Our models with stable-diffusion.cpp's activations (ggml's table GELU in the UNet's GEGLU and OpenCLIP-G,
    table quick-GELU in CLIP-L): what is left between the two sides is then summation order alone."""
    import torch.nn.functional as F
    from diffusers.models.activations import GEGLU, GELU
    from transformers.activations import GELUActivation, QuickGELUActivation

    gelu = _ggml_table(lambda x: F.gelu(x, approximate="tanh"))
    quick = _ggml_table(lambda x: x * torch.sigmoid(1.702 * x))
    saved = (GEGLU.gelu, GELU.gelu, GELUActivation.forward, QuickGELUActivation.forward)
    GEGLU.gelu = lambda self, gate: gelu(gate)
    GELU.gelu = lambda self, gate: gelu(gate)  # the MMDiT's MLPs (SD3; the UNets use GEGLU)
    GELUActivation.forward = lambda self, x: gelu(x)
    QuickGELUActivation.forward = lambda self, x: quick(x)
    try:
        yield
    finally:
        GEGLU.gelu, GELU.gelu, GELUActivation.forward, QuickGELUActivation.forward = saved


def encode_empty_prompt(pipe, family: str, transposed_projection: bool = False) -> dict:
    """The UNet's text inputs for the empty prompt from the token ids sd.cpp builds ([BOS, EOS] then padding).
    `transposed_projection`: OpenCLIP-G's pooled output through the transpose of its text projection (a
    diagnostic: what sd.cpp computes from an original-layout `text_projection`, see docs/guide/export.md)."""
    ids_l = torch.tensor([[BOS, EOS] + [EOS] * 75])
    with torch.no_grad():
        if family == "sd15":  # SD 1.x: CLIP-L's last layer after its final norm
            return {"encoder_hidden_states": pipe.text_encoder(ids_l).last_hidden_state}
        ids_g = torch.tensor([[BOS, EOS] + [0] * 75])
        hidden_l = pipe.text_encoder(ids_l, output_hidden_states=True).hidden_states[-2]
        out_g = pipe.text_encoder_2(ids_g, output_hidden_states=True)
        projection = pipe.text_encoder_2.text_projection.weight
        pooled = out_g.last_hidden_state[:, 1] @ (projection if transposed_projection else projection.T)  # at EOS
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
        return {"encoder_hidden_states": torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1),
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def sample(pipe, cond: dict, steps: int, shift: int, sdcpp_conventions: bool) -> torch.Tensor:
    """Our 1-4 step sampler with sd.cpp's noise: x0 from the scheduler's own step, re-noised to the next unshifted
    t with the k-th Philox draw (what LCMScheduler.step does with its generator's noise). Returns the latent."""
    sch = pipe.scheduler
    sch.set_timesteps(steps)
    if sdcpp_conventions:
        sch.timesteps = (sch.unshifted_timesteps.double() * shift / 1000).round().long().clamp(0, 999)
    abar = sch.alphas_cumprod
    shape = (1, 4, SIZE // 8, SIZE // 8)
    x = sdcpp_noise(0, shape)
    if sdcpp_conventions:  # sd.cpp starts from sigma_max * noise and feeds c_in(sigma) * x to the UNet
        x = x * (1 - abar[sch.unshifted_timesteps[0]]).sqrt()
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            eps = pipe.unet(x, t, **cond).sample
            x = sch.step(eps, t, x).denoised
            if i + 1 < len(sch.timesteps):
                a = abar[sch.unshifted_timesteps[i + 1]]
                x = a.sqrt() * x + (1 - a).sqrt() * sdcpp_noise(i + 1, shape)
    return x


def to_image(pipe, latent: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        image = pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample
    return (pipe.image_processor.postprocess(image, output_type="np")[0] * 255).round().astype(np.uint8)


def references(family: str, paths: dict[str, Path], shift: int, work: Path) -> None:
    """Our images for every case, saved as WORK/ours/*.png (run in a child process: its fp32 model is gone
    before sd.cpp loads its own)."""
    from PIL import Image

    from nitrofusion.worlds.pipelines.pipeline import load_pipeline

    out = work / "ours"
    out.mkdir(exist_ok=True)
    log("our side: the single file loaded as `generate` loads it (fp32)")
    pipe = load_pipeline(paths["single"], base=paths["base"], shift=shift, dtype=torch.float32, log=log)
    cond = encode_empty_prompt(pipe, family)
    abar = pipe.scheduler.alphas_cumprod
    (work / "sigmas.json").write_text(json.dumps({n: sigmas(abar, n) for n in (1, 4)}))
    with torch.no_grad():  # the check's own loop at 1 step IS the shipped pipeline at 1 step
        call = {"prompt_embeds": cond["encoder_hidden_states"], "num_inference_steps": 1, "height": SIZE,
                "width": SIZE, "output_type": "latent", "latents": sdcpp_noise(0, (1, 4, SIZE // 8, SIZE // 8))}
        if family == "sdxl":
            call.update(pooled_prompt_embeds=cond["added_cond_kwargs"]["text_embeds"], guidance_scale=1.0)
        else:
            call.update(guidance_scale=1.0)
        shipped = pipe(**call).images
    loop = sample(pipe, cond, 1, shift, False)
    gap = float((loop - shipped).abs().max())
    if gap > 1e-5:
        raise SystemExit(f"the check's sampler differs from the shipped pipeline at 1 step (max {gap:.2e})")

    def save(name: str, c: dict, steps: int, s: int, conventions: bool) -> None:
        if not (out / f"{name}.png").exists():  # a rerun computes only what is missing
            Image.fromarray(to_image(pipe, sample(pipe, c, steps, s, conventions))).save(out / f"{name}.png")

    for steps in (1, 4):
        save(f"ours-{steps}", cond, steps, shift, False)
        save(f"conv-{steps}", cond, steps, shift, True)
    with ggml_activations():  # sd.cpp's arithmetic: its activations and (SDXL) its pooled projection
        ggml_cond = encode_empty_prompt(pipe, family, transposed_projection=family == "sdxl")
        for steps in (1, 4):
            save(f"ggml-{steps}", ggml_cond, steps, shift, True)
    if family == "sd15":  # what sd.cpp does with any SD 1.x file: no shift (t' = t)
        pipe.scheduler.register_to_config(shifted_timestep=1000)
        for steps in (1, 4):
            save(f"noshift-{steps}", cond, steps, 1000, True)
        with ggml_activations():
            for steps in (1, 4):
                save(f"ggml-noshift-{steps}", ggml_cond, steps, 1000, True)
    if "lora" in paths:
        from safetensors.torch import load_file, save_file

        pipe.load_lora_weights(str(paths["lora"]), weight_name="kohya_lora.safetensors", adapter_name="kohya")
        save("conv-lora-1", cond, 1, shift, True)
        with ggml_activations():
            save("ggml-lora-1", ggml_cond, 1, shift, True)
        pipe.delete_adapters("kohya")
        # sd.cpp 0.4.7 names kohya keys by splitting at "_", so it cannot place time_embed / label_emb: the same
        # LoRA without those 4 layers is what it can apply
        kept = {k: v for k, v in load_file(str(paths["lora"] / "kohya_lora.safetensors")).items()
                if "_time_embed_" not in k and "_label_emb_" not in k}
        save_file(kept, str(out / "kohya_lora_no_embeddings.safetensors"))
        pipe.load_lora_weights(str(out), weight_name="kohya_lora_no_embeddings.safetensors", adapter_name="part")
        with ggml_activations():
            save("ggml-lora-noemb-1", ggml_cond, 1, shift, True)
    (out / "done.json").write_text(json.dumps({"loop_vs_pipeline_max_abs": gap}))
    log(f"our side done (the check's loop equals the shipped pipeline at 1 step: max |diff| {gap:.1e})")


# ---- SD3 ------------------------------------------------------------------------------------------------------------
# sd.cpp's MMDiT (mmdit.hpp, MMDiT::MMDiT) reads only the depth from the file: depth = max(24, blocks found),
# hidden size 64 x depth, heads = depth, context 4096 wide, pooled 2048, pos_embed 192 x 192 (384 with MMDiT-X
# blocks); its CLIP-L / CLIP-G (clip.hpp, CLIPTextModel) are full size and its VAE (auto_encoder_kl.hpp) has
# ch_mult 1,2,4,4 with 2 res blocks. The smallest SD3 it loads is therefore SD3 Medium's shape: 24 joint blocks of
# width 1536 (2.0 B parameters, 4.1 GB in fp16), full-size CLIP-L and CLIP-G, the full-size 16-channel VAE. T5 may
# be absent (sd.cpp then uses 77 zero tokens in its place, SD3CLIPEmbedder::get_learned_condition_common).

SD3_SHIFT = 1000  # sd.cpp samples SD3 unshifted (its timestep_shift is SDXL-only): both sides sample unshifted
SD3_TRANSFORMER = dict(sample_size=SIZE // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
# family -> what it is: SD3 Medium's MMDiT, SD3.5 Medium's MMDiT-X (in the first 13 blocks a second, image-only
# attention `attn2`; RMS q/k norms; a 384 x 384 position grid)
SD3_FAMILIES = {"sd3": "SD3 Medium's shape: 24 joint blocks x 1536",
                "sd35": "SD3.5 Medium's shape (MMDiT-X): 24 joint blocks x 1536, attn2 in blocks 0-12, RMS q/k norms, "
                        "pos_embed_max_size 384"}


def build_sd3(work: Path, family: str = "sd3") -> dict[str, Path]:
    """A random-weight SD3 of SD3 Medium's shape, or for `sd35` SD3.5 Medium's (SD35_MEDIUM of
    nitrofusion.worlds.sd3.testing), fp16 on disk, built in fp16 (an fp32 copy of the MMDiT alone is 8 GB), without
    T5, and its single file from `export --format single-file --dtype fp16`. For `sd35` the q/k RMS-norm weights are
    drawn from U(0.5, 1.5): diffusers initialises them to ones, which would hide a dropped or misplaced norm."""
    paths = {"base": work / "base", "single": work / "model.safetensors"}
    if not (paths["base"] / "model_index.json").exists():
        import tempfile

        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

        from nitrofusion.worlds.pipelines.testing import write_tokenizer

        log(f"building a random SD3 of {SD3_FAMILIES[family]} (full CLIP-L / CLIP-G / VAE, no T5)")
        base = paths["base"]
        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer(Path(tmp))  # never used: both sides start from the token ids sd.cpp builds for ""
            tokenizers = [CLIPTokenizer.from_pretrained(tmp) for _ in range(2)]
        ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                   pad_token_id=EOS)
        encoders = []
        for i, (width, layers, heads, act) in enumerate(((768, 12, 12, "quick_gelu"), (1280, 32, 20, "gelu"))):
            torch.manual_seed(10 + i)
            enc = CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                projection_dim=width, hidden_act=act, **ids))
            if i == 0:  # SD3's CLIP-L projection is the identity (the original layout has none: sd.cpp's neither)
                enc.text_projection.weight.data = torch.eye(width)
            encoders.append(enc.half())
        torch.manual_seed(12)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=SIZE, scaling_factor=1.5305,
                            shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).half()
        pipe = StableDiffusion3Pipeline(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0],
                                        text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                                        text_encoder_3=None, tokenizer_3=None)
        pipe.save_pretrained(base, max_shard_size="1GB")
        del pipe, encoders, vae
        torch.manual_seed(13)
        torch.set_default_dtype(torch.float16)
        config = SD3_TRANSFORMER
        if family == "sd35":
            from nitrofusion.worlds.sd3.testing import SD35_MEDIUM

            config = SD35_MEDIUM
        try:
            transformer = SD3Transformer2DModel(**config)
        finally:
            torch.set_default_dtype(torch.float32)
        if family == "sd35":
            norms = {k: v for k, v in transformer.named_parameters() if ".norm_q." in k or ".norm_k." in k
                     or ".norm_added_q." in k or ".norm_added_k." in k}
            assert len(norms) == 2 * 24 + 2 * 24 + 2 * 13, sorted(norms)  # attn: image and text; attn2: image
            torch.manual_seed(14)
            with torch.no_grad():
                for v in norms.values():
                    v.copy_(torch.rand(v.shape) + 0.5)
        transformer.save_pretrained(base / "transformer", max_shard_size="1GB")  # fp16 (pos_embed fp32)
        del transformer
        index = json.loads((base / "model_index.json").read_text())
        index.update(transformer=["diffusers", "SD3Transformer2DModel"], text_encoder_3=[None, None],
                     tokenizer_3=[None, None])
        (base / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if not paths["single"].exists():
        from nitrofusion.cli import main as cli

        log("export --format single-file --dtype fp16 --shift 1000")
        assert cli(["export", str(paths["base"]), "--format", "single-file", "--shift", str(SD3_SHIFT), "--dtype",
                    "fp16", "--out", str(paths["single"])]) == 0
    return paths


def sd3_grid(steps: int) -> list[int]:
    return list(GRID[:: 4 // steps] if steps in (1, 2, 4) else GRID[:steps])


def sd3_sigmas(steps: int) -> str:
    """sd.cpp's flow denoiser feeds the MMDiT t = 1000 sigma and reads x0 = x - sigma v: sigma = t / 1000."""
    return ",".join(f"{t / 1000:g}" for t in sd3_grid(steps)) + ",0"


def encode_empty_prompt_sd3(clip_l, clip_g) -> dict:
    """SD3's inputs for "" from sd.cpp's token ids: CLIP-L and CLIP-G penultimate layers side by side, zero-padded
    to 4096, then 77 zero tokens where T5 would be (sd.cpp's count; diffusers' pipeline would use 256); pooled:
    both projected EOS outputs (CLIP-L's projection is the identity)."""
    ids_l = torch.tensor([[BOS, EOS] + [EOS] * 75])
    ids_g = torch.tensor([[BOS, EOS] + [0] * 75])
    with torch.no_grad():
        out_l = clip_l(ids_l, output_hidden_states=True)
        out_g = clip_g(ids_g, output_hidden_states=True)
    clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, 4096 - clip.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, torch.zeros(1, 77, 4096)], dim=1),
            "pooled_projections": torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)}


def fp32_on_the_fly(transformer) -> None:
    """The fp16-loaded MMDiT computing in fp32: its small outer layers in fp32 for good, each joint block converted
    to fp32 for its own forward and back (fp16 -> fp32 -> fp16 is exact). Weights from the fp16 file are the fp32
    model's weights, so this is the fp32 model's arithmetic in 4 GB instead of 8."""
    for name, child in transformer.named_children():
        if name != "transformer_blocks":
            child.float()
    for block in transformer.transformer_blocks:
        block.register_forward_pre_hook(lambda m, args: m.float() and None)
        block.register_forward_hook(lambda m, args, out: m.half() and None)


def sample_sd3(pipe, cond: dict, steps: int, sdcpp_conventions: bool) -> torch.Tensor:
    """Our scheduler's 1-4 step loop (shift 1000: the network at t, x0 = x - (t/1000) v, re-noised to the next t)
    with sd.cpp's Philox noise. sd.cpp's conventions: x_T = sigma_max x noise (0.999) and the timestep computed in
    float32 as 1000 x float32(t / 1000), as its DiscreteFlowDenoiser::sigma_to_t does."""
    from nitrofusion.method.diffusion import RectifiedFlow

    sch = pipe.scheduler
    sch.set_timesteps(steps)
    flow = RectifiedFlow(1000)
    shape = (1, 16, SIZE // 8, SIZE // 8)
    x = sdcpp_noise(0, shape)
    if sdcpp_conventions:
        x = x * np.float32(sch.unshifted_timesteps[0] / 1000)
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            fed = t.reshape(1)
            if sdcpp_conventions:
                fed = torch.tensor([np.float32(np.float32(float(t) / 1000) * np.float32(1000))])
            v = pipe.transformer(hidden_states=x, timestep=fed, **cond).sample
            x = flow.x0(v.float(), x.float(), t.long().reshape(1))
            if i + 1 < len(sch.timesteps):
                x = flow.add_noise(x, sdcpp_noise(i + 1, shape), torch.tensor([sch.unshifted_timesteps[i + 1]]))
    return x


def to_image_sd3(pipe, latent: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        cfg = pipe.vae.config
        image = pipe.vae.decode(latent / cfg.scaling_factor + cfg.shift_factor).sample
    return (pipe.image_processor.postprocess(image, output_type="np")[0] * 255).round().astype(np.uint8)


def references_sd3(paths: dict[str, Path], work: Path) -> None:
    """Our images for every case (WORK/ours/*.png): the text inputs from the base's CLIP-L / CLIP-G in fp32 (what
    `generate --model FILE --base BASE` uses: an SD3 file's MMDiT part comes from the file, the rest from the base),
    then the pipeline loaded as `generate` loads the file, its MMDiT computing in fp32 (fp32_on_the_fly)."""
    import gc

    from PIL import Image
    from transformers import CLIPTextModelWithProjection

    from nitrofusion.worlds.sd3.pipeline import load_pipeline

    out = work / "ours"
    out.mkdir(exist_ok=True)
    log("our side: CLIP-L and CLIP-G in fp32 for the empty prompt")
    clip_l = CLIPTextModelWithProjection.from_pretrained(paths["base"] / "text_encoder", dtype=torch.float32)
    clip_g = CLIPTextModelWithProjection.from_pretrained(paths["base"] / "text_encoder_2", dtype=torch.float32)
    cond = encode_empty_prompt_sd3(clip_l, clip_g)
    with ggml_activations():
        ggml_cond = encode_empty_prompt_sd3(clip_l, clip_g)
    del clip_l, clip_g
    gc.collect()
    log("our side: the single file loaded as `generate` loads it (shift 1000), the MMDiT computing in fp32")
    pipe = load_pipeline(paths["single"], base=paths["base"], shift=SD3_SHIFT, dtype=torch.float16)
    pipe.text_encoder = pipe.text_encoder_2 = None  # the inputs above stand in for them
    gc.collect()
    pipe.vae.float()
    fp32_on_the_fly(pipe.transformer)
    (work / "sigmas.json").write_text(json.dumps({n: sd3_sigmas(n) for n in (1, 4)}))
    shape = (1, 16, SIZE // 8, SIZE // 8)
    with torch.no_grad():  # the check's loop at 1 step IS the shipped pipeline at 1 step
        shipped = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                       guidance_scale=1.0, num_inference_steps=1, height=SIZE, width=SIZE, output_type="latent",
                       latents=sdcpp_noise(0, shape)).images
    loop = sample_sd3(pipe, cond, 1, False)
    gap = float((loop - shipped).abs().max())
    log(f"1 step: |x0| std {float(loop.std()):.3f}; loop vs shipped pipeline max |diff| {gap:.1e}")
    if gap > 1e-5:
        raise SystemExit(f"the check's sampler differs from the shipped pipeline at 1 step (max {gap:.2e})")

    def save(name: str, c: dict, steps: int, conventions: bool) -> None:
        if not (out / f"{name}.png").exists():
            log(f"our side: {name}")
            Image.fromarray(to_image_sd3(pipe, sample_sd3(pipe, c, steps, conventions))).save(out / f"{name}.png")

    for steps in (1, 4):
        save(f"conv-{steps}", cond, steps, True)
        with ggml_activations():
            save(f"ggml-{steps}", ggml_cond, steps, True)
        save(f"ours-{steps}", cond, steps, False)
    (out / "done.json").write_text(json.dumps({"loop_vs_pipeline_max_abs": gap}))
    log(f"our side done (the check's loop equals the shipped pipeline at 1 step: max |diff| {gap:.1e})")


# ---- sd.cpp's side and the comparison -----------------------------------------------------------------------------

def probe_plan(family: str, paths: dict[str, Path], shift: int, work: Path, threads: int) -> dict:
    sig = json.loads((work / "sigmas.json").read_text())
    sdcpp_shift = shift if family == "sdxl" else 0  # sd.cpp ignores (and warns about) a shift on SD 1.x and SD3
    if family in SD3_FAMILIES:  # weights as stored only: in f32 sd.cpp's MMDiT alone would take 8 GB
        cases = [{"name": f"default-{n}", "prompt": "", "width": SIZE, "height": SIZE, "seed": SEED,
                  "cfg_scale": 1.0, "sample_method": "lcm", "steps": n, "sigmas": sig[str(n)], "timestep_shift": 0}
                 for n in (1, 4)]
        return {"threads": threads, "models": [{"name": "default", "checkpoint": str(paths["single"]),
                                                "wtype": "default", "cases": cases}]}

    def case(name: str, steps: int, prompt: str = "") -> dict:
        return {"name": name, "prompt": prompt, "width": SIZE, "height": SIZE, "seed": SEED, "cfg_scale": 1.0,
                "sample_method": "lcm", "steps": steps, "sigmas": sig[str(steps)], "timestep_shift": sdcpp_shift}

    models = []
    for wtype in ("f32", "default"):
        cases = [case(f"{wtype}-1", 1), case(f"{wtype}-4", 4)]
        if "lora" in paths:
            cases.append(case(f"{wtype}-lora-1", 1, "<lora:kohya_lora:1>"))
        model = {"name": wtype, "checkpoint": str(paths["single"]), "wtype": wtype, "cases": cases}
        if "lora" in paths:
            model["lora_dir"] = str(paths["lora"])
        models.append(model)
    return {"threads": threads, "models": models}


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def image_error(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a - b)
    mse = float((d.astype(np.float64) ** 2).mean())
    return {"mean_abs": round(float(d.mean()), 3), "max_abs": int(d.max()),
            "over_2_levels": round(float((d > 2).mean()), 4),
            "psnr_db": round(10 * np.log10(255**2 / mse), 1) if mse > 0 else float("inf")}


def compare(family: str, work: Path, shift: int) -> list[dict]:
    """Required: sd.cpp in f32 against our sampler with sd.cpp's conventions and its arithmetic (ggml's table
    GELUs; for SDXL, OpenCLIP-G's text projection applied transposed, as sd.cpp 0.4.7 reads an original-layout
    `text_projection`): then only summation order differs, so the mean error must stay under half an 8-bit level
    and no pixel may move more than 8. Informational: with our own arithmetic, our sampler as shipped (the rounding
    and x_T scale), and sd.cpp's f16 weights (f16 activations inside its matmuls)."""
    ours, got = work / "ours", work / "sdcpp"
    rows = []
    if family in SD3_FAMILIES:
        return compare_sd3(ours, got)

    def row(check: str, mine: str, theirs: str, required: bool) -> None:
        a, b = load_png(ours / f"{mine}.png"), load_png(got / f"{theirs}.png")
        err = image_error(a, b)
        ok = passes(err)
        rows.append({"check": check, "ok": ok, "required": required, "pixel_std": round(float(b.std()), 1), **err})

    unshifted = "" if family == "sdxl" else "noshift-"
    for steps in (1, 4):
        row(f"{steps} step, sd.cpp f32 vs ours with sd.cpp's conventions and arithmetic",
            f"ggml-{unshifted}{steps}", f"f32-{steps}", True)
        row(f"{steps} step, sd.cpp f32 vs ours with sd.cpp's conventions", f"conv-{steps}" if not unshifted
            else f"noshift-{steps}", f"f32-{steps}", False)
        shipped = "ours as shipped" + ("" if family == "sdxl" else f" (shift {shift}; sd.cpp samples unshifted)")
        row(f"{steps} step, sd.cpp f32 vs {shipped}", f"ours-{steps}", f"f32-{steps}", False)
        row(f"{steps} step, sd.cpp f16 (as stored) vs ours with sd.cpp's conventions and arithmetic",
            f"ggml-{unshifted}{steps}", f"default-{steps}", False)
    if (ours / "ggml-lora-1.png").exists():
        base_a = load_png(ours / "ggml-1.png")
        for mine, what, required in (("ggml-lora-noemb-1", "without the 4 embedding layers sd.cpp cannot place",
                                      True), ("ggml-lora-1", "whole", False)):
            for wtype in ("f32", "default"):
                a, b = load_png(ours / f"{mine}.png"), load_png(got / f"{wtype}-lora-1.png")
                effect = (a - base_a).astype(np.float64)
                diff = (b - load_png(got / f"{wtype}-1.png")) - effect
                rel = float(np.linalg.norm(diff) / max(np.linalg.norm(effect), 1e-12))
                err = image_error(a, b)  # judged as the images above; the effect's error is reported (8-bit
                # rounding of four images is already a few percent of an effect of a few levels)
                rows.append({"check": f"kohya LoRA at 1 step, sd.cpp {wtype}, vs ours {what}", "required":
                             required and wtype == "f32", "ok": passes(err),
                             "rel_l2_err": round(rel, 4), "effect_mean_abs": round(float(np.abs(effect).mean()), 2),
                             **err})
    return rows


def passes(err: dict) -> bool:
    """Within a tenth of a level on average and 2 at most: a misplaced q/k norm in an SD3.5 file gave 0.45 / 5
    (docs/sdcpp-check.json, sd35), rounding alone stays under 0.05 / 1."""
    return err["mean_abs"] < 0.1 and err["max_abs"] <= 2


def compare_sd3(ours: Path, got: Path) -> list[dict]:
    """Required: sd.cpp (weights as stored, f16) against our sampler with sd.cpp's conventions and activations,
    both unshifted. Informational: with our own activations, and our sampler as shipped at shift 1000 (x_T at unit
    variance)."""
    rows = []
    for steps in (1, 4):
        for mine, what, required in ((f"ggml-{steps}", "ours with sd.cpp's conventions and arithmetic", True),
                                     (f"conv-{steps}", "ours with sd.cpp's conventions", False),
                                     (f"ours-{steps}", "ours as shipped (shift 1000)", False)):
            a, b = load_png(ours / f"{mine}.png"), load_png(got / f"default-{steps}.png")
            err = image_error(a, b)
            rows.append({"check": f"{steps} step, unshifted, sd.cpp f16 (as stored) vs {what}", "required": required,
                         "ok": passes(err), "pixel_std": round(float(b.std()), 1),
                         **err})
    return rows


def run_family(family: str, args) -> dict:
    work = args.work / family
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "ours" / "done.json").exists():  # building and our references in a child: this process stays
        subprocess.run([sys.executable, __file__, "--python", args.python, "--work", str(args.work), "--shift",
                        str(args.shift), "--rank", str(args.rank), "--family", family, "--references-only"],
                       check=True)  # small while sd.cpp holds its own copy of the model
    paths = build(family, work, args.shift, args.rank)
    plan = probe_plan(family, paths, args.shift, work, args.threads)
    (work / "plan.json").write_text(json.dumps(plan, indent=2))
    log(f"stable-diffusion.cpp side ({family})")
    if not (work / "sdcpp" / "probe.json").exists():  # a rerun keeps sd.cpp's images
        with open(work / "sdcpp.log", "w") as err:
            subprocess.run([args.python, str(Path(__file__).with_name("sdcpp_probe.py")), "--plan",
                            str(work / "plan.json"), "--out", str(work / "sdcpp")], check=True, stderr=err)
    probe = json.loads((work / "sdcpp" / "probe.json").read_text())
    text = (work / "sdcpp.log").read_text(errors="replace")
    notable = sorted({line.strip()[:200] for line in text.splitlines()
                      if any(k in line for k in ("[WARN", "[ERROR", "Version:", "version", "unknown tensor",
                                                 "lora", "shift", "MMDiT"))})
    extra = {"transformer": SD3_FAMILIES[family], "shift_both_sides": SD3_SHIFT,
             "sigmas": json.loads((work / "sigmas.json").read_text())} if family in SD3_FAMILIES else {}
    return {**extra, "binding": probe["binding"], "load_and_sample_s": probe["models"], "log": notable[:40],
            "our_loop_vs_shipped_pipeline_1_step": json.loads((work / "ours" / "done.json").read_text()),
            "checks": compare(family, work, args.shift)}


def main() -> int:
    ap = argparse.ArgumentParser(description="check that stable-diffusion.cpp loads nitrofusion's exports")
    ap.add_argument("--python", required=True, help="a Python with stable-diffusion-cpp-python installed")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--family", nargs="+", default=["sdxl", "sd15"], choices=["sdxl", "sd15", "sd3", "sd35"])
    ap.add_argument("--shift", type=int, default=250)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=-1, help="sd.cpp's threads (default: its own choice)")
    ap.add_argument("--references-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 0 <= args.shift <= 1000:
        ap.error(f"--shift {args.shift} is outside [0, 1000]: NitroSD-Realism uses 250, -Vibrant 500")
    if args.references_only:
        family = args.family[0]
        if family in SD3_FAMILIES:
            references_sd3(build(family, args.work / family, args.shift, args.rank), args.work / family)
            return 0
        references(family, build(family, args.work / family, args.shift, args.rank), args.shift,
                   args.work / family)
        return 0
    report = {"shift": args.shift, "size": SIZE, "seed": SEED, "families": {}}
    for family in args.family:
        report["families"][family] = run_family(family, args)
    (args.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    ok = True
    for family, result in report["families"].items():
        print(f"\n{family}: stable-diffusion-cpp-python {result['binding']}")
        print("| check | ok | mean abs (8-bit levels) | max abs | PSNR dB | detail |\n|---|---|---|---|---|---|")
        for r in result["checks"]:
            detail = (f"the LoRA moves the image by {r['effect_mean_abs']} levels on average; error of that move "
                      f"{r['rel_l2_err']:.3f}" if "rel_l2_err" in r else "")
            print(f"| {r['check']}{'' if r['required'] else ' (informational)'} | {'yes' if r['ok'] else 'NO'} | "
                  f"{r['mean_abs']} | {r['max_abs']} | {r['psnr_db']} | {detail} |")
            ok &= r["ok"] or not r["required"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
