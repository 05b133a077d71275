"""Which model family a weights file belongs to, so a file from another family is refused in one line that
names both, instead of failing deep inside a key converter.

UNet families differ in their cross-attention width (the text encoder's hidden size): 768 for Stable
Diffusion 1.x, 1024 for 2.x, 1280 for the SDXL refiner, 2048 for SDXL. It is read from the first
cross-attention key projection under every naming we meet: diffusers, the original (SGM/LDM) layout, PEFT
LoRA factors and kohya LoRA factors. Files without cross-attention (DiT and flow models) are named by
diffusers' own single-file detector.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NitroFusionError

FAMILIES = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 1280: "the SDXL refiner", 2048: "SDXL"}
# the key projection of a cross-attention layer (its input width is the text width), by naming scheme
_CROSS_ATTENTION_KEYS = ("attn2.to_k.weight", "attn2.to_k.lora_A.weight", "attn2.to_k.lora_down.weight",
                         "attn2_to_k.lora_down.weight", "attn2.to_k.lora.down.weight")


def is_lora(state: dict[str, torch.Tensor]) -> bool:
    return any(".lora_A." in k or ".lora_down." in k or ".lora.down." in k for k in state)


def cross_attention_width(state: dict[str, torch.Tensor]) -> int | None:
    for key, value in state.items():
        if key.endswith(_CROSS_ATTENTION_KEYS) and value.ndim >= 2:
            return int(value.shape[1])
    return None


def family_name(width: int | None) -> str:
    if width is None:
        return "an unknown architecture"
    return FAMILIES.get(width, f"a UNet with cross-attention width {width}") + (
        f" (cross-attention width {width})" if width in FAMILIES else "")


def describe_state(state: dict[str, torch.Tensor]) -> str:
    width = cross_attention_width(state)
    if width is not None:
        return family_name(width)
    try:  # no cross-attention: a transformer family; let diffusers' checkpoint detector name it
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        return f"'{infer_diffusers_model_type(state)}' (diffusers' name; not a UNet with cross-attention)"
    except Exception:  # noqa: BLE001 - the detector indexes keys it assumes; any failure means "unknown"
        return "an unknown architecture (no cross-attention weights)"


def check_family(state: dict[str, torch.Tensor], unet_config: dict, what: str, base: Path) -> None:
    """Refuse `state` (a UNet or a LoRA) unless it has the base UNet's cross-attention width."""
    want = int(unet_config["cross_attention_dim"])
    got = cross_attention_width(state)
    if got != want:
        base_name = family_name(want)
        if want not in FAMILIES and unet_config.get("addition_embed_type") == "text_time":
            base_name = f"an SDXL-layout UNet (cross-attention width {want})"
        raise NitroFusionError(f"{what} is {describe_state(state)}, but the base {base} is {base_name}: "
                               "give a base of the same family (or a file made for this base)")


ORIGINAL_MMDIT_KEY = "model.diffusion_model.joint_blocks."  # the original (Stability AI / ComfyUI) SD3 layout


def is_lora_weights(path: Path) -> bool:
    """Whether a .safetensors file holds LoRA factors, from its header alone."""
    return is_lora(_header(path) or {})


def _header(path: Path) -> dict[str, list[int]] | None:
    """A .safetensors file's tensor names and shapes, from its header alone (whole even when the file was cut
    short after it); None if it is no safetensors file."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from .weights import safetensors_header

    try:
        header, _ = safetensors_header(path)
    except NitroFusionError:  # not a safetensors file: not ours to claim
        return None
    return {k: v.get("shape", []) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def is_dit_weights(path: Path) -> bool:
    """Whether a .safetensors file holds a DiT (an SD3 or FLUX.1 transformer) or a LoRA of one: diffusers keys
    (`transformer.`-prefixed or not), whose context embedder or top-level joint blocks no UNet has, or an original
    layout (SD3's joint blocks, a single file with text encoders and VAE included; FLUX's double/single blocks).
    `is_flux_weights` tells FLUX's apart. Reads the header only."""
    return is_dit_keys(_header(path) or {})


def is_dit_keys(keys) -> bool:
    # a UNet's transformer_blocks sit inside its attentions (down_blocks.N.attentions.M.transformer_blocks...),
    # an MMDiT's at the top: that alone tells an SD3 LoRA, which has no context embedder, from a UNet LoRA
    return any(k.removeprefix("transformer.").startswith(("context_embedder.", "transformer_blocks."))
               or k.startswith(ORIGINAL_MMDIT_KEY) for k in keys) or is_flux_keys(keys)


# FLUX.1's blocks no SD3 transformer has: diffusers' single-stream blocks, Black Forest Labs' double/single blocks
# (flux1-dev.safetensors' layout, bare or under model.diffusion_model. as ComfyUI saves it)
_FLUX_PREFIXES = ("single_transformer_blocks.", "double_blocks.", "single_blocks.")


def is_flux_keys(keys) -> bool:
    return any(k.removeprefix("transformer.").removeprefix("model.diffusion_model.").startswith(_FLUX_PREFIXES)
               for k in keys)


def is_flux_weights(path: Path) -> bool:
    """Whether a .safetensors file holds a FLUX.1 transformer (diffusers keys or the BFL layout that `export
    --format single-file` writes) or a LoRA of one. Reads the header only."""
    return is_flux_keys(_header(path) or {})


def dit_family(keys) -> str | None:
    """'flux', 'sd3', or None (a UNet or unknown) from a file's tensor names."""
    return "flux" if is_flux_keys(keys) else "sd3" if is_dit_keys(keys) else None


def check_file_base(path: Path, base: Path, family) -> None:
    """A weights file given with --base must be of the base's family (`family`: worlds/pipelines/family.py's): an
    SD3 transformer with an SD3 pipeline, a FLUX.1 one with a FLUX pipeline, a UNet with an SDXL or SD one. One line
    naming both, from the file's header, before any weights load."""
    shapes = _header(path)
    if shapes is None:
        return  # a torch file or an unreadable one: its loader says what it is
    dit = dit_family(shapes)
    if dit == (family.world if family.world in ("sd3", "flux") else None):
        return
    base_text = f"--base {base} is {family.article} {family.label} pipeline ({family.pipeline})"
    lora = is_lora(shapes)
    if dit:
        what = {"sd3": "an SD3 transformer", "flux": "a FLUX.1 transformer"}[dit]
        raise NitroFusionError(f"{path} is {'a LoRA of ' if lora else ''}{what} but {base_text}: give the "
                               f"{'SD3' if dit == 'sd3' else 'FLUX.1'} pipeline it belongs to")
    width = next((s[1] for k, s in shapes.items() if k.endswith(_CROSS_ATTENTION_KEYS) and len(s) >= 2), None)
    kind = "a UNet LoRA" if lora else "a UNet checkpoint"
    if width in FAMILIES:
        what = f"{kind} of {FAMILIES[width]} (cross-attention width {width})"
    elif width is not None:
        what = f"a UNet LoRA with cross-attention width {width}" if lora else family_name(width)
    else:
        what = f"not {'an SD3' if family.world == 'sd3' else 'a FLUX.1'} transformer"
    raise NitroFusionError(f"{path} is {what} but {base_text}: give the SDXL or SD pipeline it belongs to")


def unet_level_channels(config: dict) -> list[int]:
    """The channels of E's feature levels (method/backbone.py) from a diffusers UNet's config.json alone: conv_in,
    every resnet of the down path, a downsampler after every block but the last, the mid block."""
    blocks = config["block_out_channels"]
    layers = config.get("layers_per_block", 2)
    layers = [layers] * len(blocks) if isinstance(layers, int) else list(layers)
    chans = [blocks[0]]
    for i, ch in enumerate(blocks):
        chans += [ch] * layers[i] + ([ch] if i < len(blocks) - 1 else [])
    return chans + [blocks[-1]]
