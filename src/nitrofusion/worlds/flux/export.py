"""A FLUX.1 student as ONE transformer .safetensors file in Black Forest Labs' original layout: the layout of
`flux1-dev.safetensors` (bare keys, no VAE or text encoders), which ComfyUI's UNETLoader ("Load Diffusion Model") and
diffusers' `FluxTransformer2DModel.from_single_file` read.

- img_in, txt_in (the image/text token embedders), time_in / vector_in / guidance_in (`in_layer`, `out_layer`: the
  timestep, pooled-CLIP and embedded-guidance MLPs);
- double_blocks.N: img_mod.lin / txt_mod.lin (the streams' AdaLN modulations), img_attn.qkv / txt_attn.qkv (each
  stream's q, k, v packed in that order), img_attn.norm.query_norm.scale / key_norm.scale (RMSNorm weights) and
  txt_attn's, img_attn.proj / txt_attn.proj, img_mlp.0/.2 and txt_mlp.0/.2;
- single_blocks.N: modulation.lin, linear1 = [q, k, v, mlp in] packed, norm.query_norm.scale / key_norm.scale,
  linear2 (the output projection of [attention, mlp], diffusers' proj_out as it is);
- final_layer.linear and final_layer.adaLN_modulation.1, whose halves are (shift, scale) where diffusers' final
  AdaLayerNormContinuous has (scale, shift).

The diffusers -> BFL map is written here; every export is converted back with diffusers' own BFL -> diffusers converter
(`convert_flux_transformer_checkpoint_to_diffusers`, what `from_single_file` runs) and written only if every tensor
comes back bitwise equal. That converter packs FLUX.1's width into its code (3072: the single blocks' linear1 split);
for a model of another width (the tests' tiny FLUX) it runs with that one constant set to the model's width
(pipeline.py `diffusers_converter`, which also reads such files for `generate`).
"""

from __future__ import annotations

import types
from pathlib import Path

import torch

from ...errors import NitroFusionError
from ..pipelines.pipeline import SHIFT_METADATA_KEY, quiet_loading
from .pipeline import GUIDANCE_METADATA_KEY, bfl_to_diffusers

_EMBEDDERS = {"x_embedder": "img_in", "context_embedder": "txt_in",
              "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
              "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
# inside double block N: diffusers module -> BFL module (img: the image stream, txt: the text stream)
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
           "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
           "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
           "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
           "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
           "proj_out": "linear2"}
# packed projections, their parts in the order the BFL layout concatenates them
_DOUBLE_PACKED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                  "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_PACKED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_NORMS = ("query_norm", "key_norm")  # RMSNorm weights are `scale` in the BFL layout


def _halves_swapped(t: torch.Tensor) -> torch.Tensor:
    """diffusers' final AdaLayerNormContinuous emits (scale, shift), BFL's final_layer modulation (shift, scale)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _bfl_name(module: str, param: str) -> str:
    return f"{module}.{'scale' if module.endswith(_NORMS) and param == 'weight' else param}"


def transformer_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict under Black Forest Labs' names (flux1-dev.safetensors' bare keys)."""
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}  # BFL key -> {diffusers module: tensor}
    orders: dict[str, tuple[str, ...]] = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if module in _EMBEDDERS:
            out[f"{_EMBEDDERS[module]}.{param}"] = _halves_swapped(value) if module == "norm_out.linear" else value
            continue
        head, _, rest = module.partition(".")
        block, _, inner = rest.partition(".")
        kind = {"transformer_blocks": "double", "single_transformer_blocks": "single"}.get(head)
        if kind is None or not block.isdigit():
            raise NitroFusionError(f"single-file export: the FLUX transformer key '{key}' has no place in the BFL "
                                   "layout")
        target, names, groups = ((f"double_blocks.{block}.", _DOUBLE, _DOUBLE_PACKED) if kind == "double" else
                                 (f"single_blocks.{block}.", _SINGLE, _SINGLE_PACKED))
        if inner in names:
            out[target + _bfl_name(names[inner], param)] = value
            continue
        group = next((name for name, parts in groups.items() if inner in parts), None)
        if group is None:
            raise NitroFusionError(f"single-file export: the FLUX transformer key '{key}' has no place in the BFL "
                                   "layout")
        packed.setdefault(f"{target}{group}.{param}", {})[inner] = value
        orders[f"{target}{group}.{param}"] = groups[group]
    for key, parts in packed.items():
        if set(parts) != set(orders[key]):
            raise NitroFusionError(f"single-file export: '{key}' lacks {sorted(set(orders[key]) - set(parts))}")
        out[key] = torch.cat([parts[p] for p in orders[key]], dim=0)
    return {k: v.detach().contiguous() for k, v in out.items()}


def verify_round_trip(sd: dict[str, torch.Tensor], transformer) -> int:
    """Convert `sd` back with diffusers' converter; every tensor must come back bitwise (dtype included). Returns the
    number of tensors checked."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    from ..pipelines.export import components_match

    marker = CHECKPOINT_KEY_NAMES["flux"][0]  # the key diffusers recognises a FLUX checkpoint by
    if marker not in sd:
        raise NitroFusionError(f"single-file export lacks '{marker}'")
    holder = types.SimpleNamespace(transformer=transformer)
    return components_match({"transformer": bfl_to_diffusers(sd, transformer.inner_dim)}, holder)


def architecture(config) -> str:
    """modelspec.architecture, in the model-spec's pattern (ComfyUI and diffusers detect FLUX by its keys)."""
    return "flux-1-dev" if config.get("guidance_embeds") else "flux-1-schnell"


def export_single_file(model: str | Path, out: str | Path, base: str | Path | None = None, shift: int | None = None,
                       dtype: torch.dtype | None = None) -> dict:
    from ..pipelines.export import flow_sampling_note, single_file_out, write_single_file
    from .pipeline import load_pipeline

    out = single_file_out(out)
    with quiet_loading(errors_only=True):
        pipe = load_pipeline(model, base=base, shift=shift, dtype=dtype, merge_lora=True)
    transformer = pipe.transformer
    sd = transformer_to_bfl(transformer.state_dict())
    checked = verify_round_trip(sd, transformer)
    shift_used = pipe.scheduler.config.shifted_timestep
    guidance = pipe.nitrofusion_guidance
    arch = architecture(transformer.config)
    meta = {SHIFT_METADATA_KEY: str(shift_used), GUIDANCE_METADATA_KEY: repr(guidance),
            "modelspec.architecture": arch,
            "nitrofusion.sampling": flow_sampling_note(shift_used, f"embedded guidance {guidance:g}")}
    write_single_file(out, sd, meta)
    return {"path": str(out), "tensors": len(sd), "round_trip_checked": checked, "shift": shift_used,
            "guidance": guidance, "architecture": arch}
