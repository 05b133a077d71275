"""An SD3 / SD3.5 model as one original-layout .safetensors file: the layout of Stability AI's own releases
(sd3.5_medium.safetensors) and of ComfyUI's SD3 "checkpoint with text encoders" files.

- model.diffusion_model.*: the MMDiT (x_embedder, pos_embed, t_embedder, y_embedder, context_embedder,
  joint_blocks.N.{x_block,context_block}, final_layer); q/k/v are one packed `qkv` projection per stream;
- first_stage_model.*: the VAE (the LDM layout, as SDXL's);
- text_encoders.clip_l.transformer.*, text_encoders.clip_g.transformer.*, text_encoders.t5xxl.transformer.*:
  the text encoders under transformers' own key names (T5 left out when the pipeline has none).

The diffusers -> original map is built here from the configs; every export is converted back with diffusers' own
original -> diffusers converters (what `from_single_file` runs) and written only if every tensor comes back
bitwise equal.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import NitroFusionError
from ..pipelines.export import VAE_PREFIX, _with_text_model, components_match, vae_to_original
from ..pipelines.pipeline import SHIFT_METADATA_KEY, quiet_loading
from .pipeline import MMDIT_PREFIX

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."

# diffusers module -> original module, outside the joint blocks
_OUTER = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
          "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
          "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
          "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
          "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
          "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
# inside joint block N: diffusers module -> original module (x_block: the image stream, context_block: the text's)
_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
          "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
          "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
          "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
          "attn2.norm_k": "x_block.attn2.ln_k",
          "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
          "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
          "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
# the original packs each stream's q, k, v into one projection, in that order
_PACKED = {("attn", ("to_q", "to_k", "to_v")): "x_block.attn.qkv",
           ("attn", ("add_q_proj", "add_k_proj", "add_v_proj")): "context_block.attn.qkv",
           ("attn2", ("to_q", "to_k", "to_v")): "x_block.attn2.qkv"}


def _halves_swapped(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous emits (scale, shift), the original's final modulations (shift, scale)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict under the original MMDiT names (without model.diffusion_model.)."""
    if config.get("qk_norm") not in (None, "rms_norm"):  # SD3 has none, SD3.5 RMSNorm (weights only)
        raise NitroFusionError(f"single-file export: qk_norm {config['qk_norm']!r} has no place in the original SD3 "
                               "layout (SD3 has no q/k norm, SD3.5 rms_norm)")
    last = config["num_layers"] - 1  # its text stream is "pre only": a swapped 2-way modulation, no proj or mlp
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple[tuple[str, ...], dict[str, torch.Tensor]]] = {}  # key -> (q/k/v order, parts)
    for key, value in state.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        module, param = key.rsplit(".", 1)
        if module in _OUTER:
            out[f"{_OUTER[module]}.{param}"] = _halves_swapped(value) if module == "norm_out.linear" else value
            continue
        head, _, inner = module.partition(".")
        block, _, inner = inner.partition(".")
        if head != "transformer_blocks" or not block.isdigit():
            raise NitroFusionError(f"single-file export: the SD3 transformer key '{key}' has no place in the original "
                                   "layout")
        target = f"joint_blocks.{block}."
        if inner in _BLOCK:
            swap = inner == "norm1_context.linear" and int(block) == last
            out[f"{target}{_BLOCK[inner]}.{param}"] = _halves_swapped(value) if swap else value
            continue
        attn, _, proj = inner.partition(".")
        group = next(((projs, n) for (a, projs), n in _PACKED.items() if a == attn and proj in projs), None)
        if group is None:
            raise NitroFusionError(f"single-file export: the SD3 transformer key '{key}' has no place in the original "
                                   "layout")
        packed.setdefault(f"{target}{group[1]}.{param}", (group[0], {}))[1][proj] = value
    for key, (order, parts) in packed.items():
        if set(parts) != set(order):
            raise NitroFusionError(f"single-file export: '{key}' lacks {sorted(set(order) - set(parts))}")
        out[key] = torch.cat([parts[p] for p in order], dim=0)
    return out


def text_encoders(pipe) -> dict[str, str]:
    """The pipeline's text encoders -> their original-layout prefixes (T5 only where the pipeline has one)."""
    parts = {"text_encoder": CLIP_L_PREFIX, "text_encoder_2": CLIP_G_PREFIX}
    if getattr(pipe, "text_encoder_3", None) is not None:
        parts["text_encoder_3"] = T5_PREFIX
    return parts


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """The whole SD3 pipeline as one original-layout state dict."""
    sd: dict[str, torch.Tensor] = {}
    tr = pipe.transformer
    sd.update({MMDIT_PREFIX + k: v for k, v in transformer_to_original(tr.state_dict(), tr.config).items()})
    sd.update({VAE_PREFIX + k: v for k, v in vae_to_original(pipe.vae.state_dict(), pipe.vae.config).items()})
    for name, prefix in text_encoders(pipe).items():
        state = getattr(pipe, name).state_dict()
        sd.update({prefix + k: v for k, v in (state if name == "text_encoder_3" else _with_text_model(state)).items()})
    return _untied({k: v.detach().contiguous() for k, v in sd.items()})


def _untied(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of each tensor that shares memory with an earlier one (T5's encoder.embed_tokens is its shared
    embedding): safetensors stores no shared tensors, and diffusers' T5 loader wants both names filled."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


def original_to_diffusers(sd: dict[str, torch.Tensor], pipe) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own converters, component by component (what `from_single_file` runs for SD3)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_sd3_t5_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    # the transformer converter pops what it reads: hand it its own dict
    back = {"transformer": convert_sd3_transformer_checkpoint_to_diffusers(
                {k: v for k, v in sd.items() if k.startswith(MMDIT_PREFIX)}),
            "vae": convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config))}
    for name, prefix in text_encoders(pipe).items():
        if name == "text_encoder_3":
            back[name] = convert_sd3_t5_checkpoint_to_diffusers(sd)
            continue
        state = convert_ldm_clip_checkpoint(sd, prefix)
        if not hasattr(getattr(pipe, name), "text_model"):  # as from_single_file does for a flattened CLIPTextModel
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        back[name] = state
    return back


def verify_round_trip(sd: dict[str, torch.Tensor], pipe) -> int:
    """Convert `sd` back with diffusers' converters; every tensor of every component must come back bitwise.
    Returns the number of tensors checked."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    markers = [CHECKPOINT_KEY_NAMES["sd3"][1], CHECKPOINT_KEY_NAMES["clip_sd3"], CHECKPOINT_KEY_NAMES["open_clip_sd3"]]
    if getattr(pipe, "text_encoder_3", None) is not None:
        markers.append(T5_PREFIX + "shared.weight")
    for marker in markers:  # the keys diffusers recognises an SD3 checkpoint and its encoders by
        if marker not in sd:
            raise NitroFusionError(f"single-file export lacks '{marker}'")
    return components_match(original_to_diffusers(sd, pipe), pipe)


def architecture(config) -> str:
    """modelspec.architecture. ComfyUI writes "stable-diffusion-v3-medium" for every SD3 it saves (its code marks
    the other variants a TODO); the 3.5 names follow that pattern, and no tool is known to read them: loaders
    detect SD3 models by their keys. From the config: only SD3.5 Medium (MMDiT-X) has dual-attention blocks; SD3.5
    Large (and Large Turbo) adds RMS q/k norms without them; SD3 Medium has neither."""
    if config.get("dual_attention_layers"):
        return "stable-diffusion-v3.5-medium"
    if config.get("qk_norm") == "rms_norm":
        return "stable-diffusion-v3.5-large"
    return "stable-diffusion-v3-medium"


def is_identity(weight: torch.Tensor) -> bool:
    return weight.ndim == 2 and weight.shape[0] == weight.shape[1] and torch.equal(
        weight, torch.eye(weight.shape[0], dtype=weight.dtype))


def export_single_file(model: str | Path, out: str | Path, base: str | Path | None = None, shift: int | None = None,
                       dtype: torch.dtype | None = None) -> dict:
    from ..pipelines.export import flow_sampling_note, single_file_out, write_single_file
    from .pipeline import load_pipeline

    out = single_file_out(out)
    with quiet_loading(errors_only=True):  # diffusers warns that an fp16 pipeline cannot *run* on a CPU
        pipe = load_pipeline(model, base=base, shift=shift, dtype=dtype, merge_lora=True)
    sd = pipeline_to_original(pipe)
    checked = verify_round_trip(sd, pipe)
    shift_used = pipe.scheduler.config.shifted_timestep
    arch = architecture(pipe.transformer.config)
    meta = {SHIFT_METADATA_KEY: str(shift_used), "modelspec.architecture": arch,
            "nitrofusion.sampling": flow_sampling_note(shift_used, "guidance scale 0")}
    write_single_file(out, sd, meta)
    # the original layout's CLIP-L pools without its projection: loaders of this layout (diffusers'
    # from_single_file, ComfyUI) use the identity there, so only an identity projection gives them our embedding
    projection = sd.get(CLIP_L_PREFIX + "text_projection.weight")
    return {"path": str(out), "tensors": len(sd), "round_trip_checked": checked, "shift": shift_used,
            "architecture": arch, "t5": "text_encoder_3" in text_encoders(pipe),
            "clip_l_projection_identity": projection is None or is_identity(projection)}
