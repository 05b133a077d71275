"""Moving models out of (and between) NitroFusion runs: diffusers folders, original single files, LoRAs, and
the weight-delta transfer of docs/method.md §6.

- diffusers: a complete pipeline folder (the base's text encoders, tokenizers and VAE + the student UNet +
  TimestepShiftLCMScheduler), loadable by stock `StableDiffusionXLPipeline.from_pretrained` (SD 1.x/2.x:
  `StableDiffusionPipeline`) once nitrofusion is imported.
- single-file: the original checkpoint layout that A1111 and ComfyUI load (model.diffusion_model.*,
  first_stage_model.*, and SDXL's conditioner.embedders.{0,1}.* or SD's cond_stage_model.*: CLIP ViT-L for 1.x,
  OpenCLIP ViT-H for 2.x). The diffusers -> original key map is built here from the model configs; every export
  is checked by converting back with diffusers' own original -> diffusers converters and comparing every tensor
  bitwise.
- lora: per-layer truncated SVD of student - base over every Linear and Conv2d of the UNet, saved in diffusers'
  PEFT format; what LoRA cannot hold (norms, biases) is reported, never hidden.
- transfer: theta_custom + (theta_student - theta_base) in fp32 (docs/method.md §6).

Every output is built in a temporary sibling of --out and renamed into place at the end: a failure leaves
nothing at --out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ... import faults
from ...errors import NitroFusionError
from ...io import disk_errors, tensor_bytes
from ...models.weights import check_same_layout, read_weights_file
from .family import SDXL, family_of_unet_config
from .hub import local_model
from .pipeline import (
    SHIFT_METADATA_KEY,
    ModelRef,
    is_original_layout,
    load_pipeline,
    load_scheduler,
    load_unet,
    model_kind,
    need_base,
    quiet_loading,
    resolve,
    stored_dtype,
    to_diffusers_unet_keys,
    unet_folder,
    unet_from_state,
)

FORMATS = ("diffusers", "single-file", "lora")
SCHEDULER_ENTRY = ["nitrofusion", "TimestepShiftLCMScheduler"]
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_L_PREFIX, CLIP_G_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
SD1_CLIP_PREFIX, SD2_CLIP_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."


@contextlib.contextmanager
def staged_output(out: Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `out` to write into (a file or a folder); rename it to `out` only when the
    block succeeds. An existing `out` is never overwritten. A full disk is one line saying about how much space
    the export (`needed` bytes) takes, and leaves nothing behind."""
    out = Path(out)
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise NitroFusionError(f"cannot write next to {out} ({e.strerror})") from None
    try:
        staged = holder / out.name
        with disk_errors("the export", out, fix="then run the export again", needed=needed):
            yield staged
            faults.point("export-write")  # everything written, not yet renamed into place
        if not staged.exists():
            raise NitroFusionError(f"nothing was written for {out}")
        os.replace(staged, out)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


# ---- diffusers folder -----------------------------------------------------------------------------------------


def export_diffusers(model: str | Path, out: str | Path, base: str | Path | None = None, shift: int | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    out = Path(out)
    if out.exists():  # fail before loading anything
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    pipe = load_pipeline(model, base=base, shift=shift, dtype=dtype)
    size = pipe.nitrofusion_resolution
    if size and size != pipe.unet.config.sample_size * pipe.vae_scale_factor:
        # the stock pipeline's default image size comes from sample_size: make it the run's resolution
        pipe.unet.register_to_config(sample_size=size // pipe.vae_scale_factor)
    weights = sum(tensor_bytes(m.state_dict()) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    with staged_output(out, weights) as tmp, quiet_loading():
        pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        # save_pretrained records the defining module (nitrofusion.schedulers); name the package, whose lazy
        # attributes give diffusers both the class and its SchedulerMixin base
        index["scheduler"] = SCHEDULER_ENTRY
        index.pop("_name_or_path", None)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


# ---- single file: diffusers -> original (SGM / LDM) layout--------------------------------------------------------

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_module_map(config) -> dict[str, tuple[str, dict[str, str] | None]]:
    """diffusers module prefix -> (original prefix, renames of the parts inside it) for an SDXL- or SD-layout UNet
    (LDM/SGM's UNetModel: input_blocks / middle_block / output_blocks; SD 1.x/2.x have no add_embedding)."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise NitroFusionError("single-file export needs one layers_per_block for all UNet blocks (SDXL's and SD's "
                               "layout)")
    n = len(config["block_out_channels"])
    m: dict[str, tuple[str, dict[str, str] | None]] = {
        "time_embedding.linear_1": ("time_embed.0", None), "time_embedding.linear_2": ("time_embed.2", None),
        "add_embedding.linear_1": ("label_emb.0.0", None), "add_embedding.linear_2": ("label_emb.0.2", None),
        "conv_in": ("input_blocks.0.0", None), "conv_norm_out": ("out.0", None), "conv_out": ("out.2", None),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET), "mid_block.attentions.0": ("middle_block.1", None),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
    }
    for b in range(n):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            m[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{i}.0", _UNET_RESNET)
            m[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{i}.1", None)
        if b < n - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op", None)
        has_attention = config["up_block_types"][b].startswith("CrossAttn")
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            m[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{i}.0", _UNET_RESNET)
            m[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{i}.1", None)
        if b < n - 1:
            last = b * (lpb + 1) + lpb
            m[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{last}.{2 if has_attention else 1}.conv", None)
    return m


def vae_module_map(config) -> dict[str, tuple[str, dict[str, str] | None]]:
    n = len(config["block_out_channels"])
    resnet = {"conv_shortcut": "nin_shortcut"}
    m: dict[str, tuple[str, dict[str, str] | None]] = {
        "quant_conv": ("quant_conv", None), "post_quant_conv": ("post_quant_conv", None)}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", None)
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", None)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
        for k in range(2):
            m[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", resnet)
    for i in range(n):
        for j in range(config["layers_per_block"]):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", resnet)
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", None)
        for j in range(config["layers_per_block"] + 1):  # decoder blocks are numbered from the bottom
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{n - 1 - i}.block.{j}", resnet)
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{n - 1 - i}.upsample.conv", None)
    return m


def _remap(state: dict[str, torch.Tensor], modules: dict, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest module prefix that the map knows
            prefix = ".".join(parts[:cut])
            if prefix in modules:
                new_prefix, renames = modules[prefix]
                rest = ".".join(parts[cut:])
                for old, new in (renames or {}).items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                out[f"{new_prefix}.{rest}"] = value
                break
        else:
            raise NitroFusionError(f"single-file export: the {what} key '{key}' has no place in the original "
                                   "layout (is this an SDXL- or SD-layout model?)")
    return out


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    return _remap(state, unet_module_map(config), "UNet")


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    out = _remap(state, vae_module_map(config), "VAE")
    for k, v in out.items():  # the original mid-block attention is 1x1 convolutions
        if ".mid.attn_1." in k and k.endswith(".weight") and v.ndim == 2:
            out[k] = v[:, :, None, None]
    return out


def _with_text_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the original layout keeps it."""
    return {k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k: v
            for k, v in state.items() if not k.endswith("position_ids")}


def open_clip_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection -> OpenCLIP text tower (SDXL's second encoder)."""
    state = _with_text_model(state)
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    inner = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in state.items():
        if key in fixed:
            out[fixed[key]] = v
        elif key == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()  # OpenCLIP multiplies x @ text_projection
        elif key.startswith("text_model.encoder.layers."):
            layer, rest = key.removeprefix("text_model.encoder.layers.").split(".", 1)
            head = f"transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault(f"{head}attn.in_proj_{kind}", {})[proj[0]] = v
                continue
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    out[head + new + rest[len(old):]] = v
                    break
            else:
                raise NitroFusionError(f"single-file export: unknown text encoder key '{key}'")
        else:
            raise NitroFusionError(f"single-file export: unknown text encoder key '{key}'")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # OpenCLIP's packed in_proj
    return out


def text_layout(pipe) -> str:
    """Which original text-encoder layout a pipeline's encoders take: "sdxl" (CLIP ViT-L + OpenCLIP bigG), "sd2"
    (OpenCLIP ViT-H: SD 2.x, whose UNet alone uses linear projections among SD UNets) or "sd1" (CLIP ViT-L)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.unet.config.use_linear_projection else "sd1"


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict."""
    sd: dict[str, torch.Tensor] = {}
    sd.update({UNET_PREFIX + k: v for k, v in unet_to_original(pipe.unet.state_dict(), pipe.unet.config).items()})
    sd.update({VAE_PREFIX + k: v for k, v in vae_to_original(pipe.vae.state_dict(), pipe.vae.config).items()})
    text = pipe.text_encoder.state_dict()
    layout = text_layout(pipe)
    if layout == "sdxl":
        sd.update({CLIP_L_PREFIX + k: v for k, v in _with_text_model(text).items()})
        sd.update({CLIP_G_PREFIX + k: v for k, v in open_clip_from_hf(pipe.text_encoder_2.state_dict()).items()})
    elif layout == "sd2":
        sd.update({SD2_CLIP_PREFIX + k: v for k, v in with_identity_last_block(open_clip_from_hf(text)).items()})
    else:
        sd.update({SD1_CLIP_PREFIX + k: v for k, v in _with_text_model(text).items()})
    return {k: v.detach().contiguous() for k, v in sd.items()}


OPEN_CLIP_H_BLOCKS = 24  # OpenCLIP ViT-H's text tower, as the released SD 2.x files carry it


def with_identity_last_block(tower: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 2.x conditions on ViT-H's penultimate layer, so diffusers' folders keep 23 of its 24 blocks; ComfyUI and
    stable-diffusion.cpp build all 24 (and read the penultimate output). The missing block is written with zero
    weights: both LayerNorms then output 0, so the attention and MLP branches add exactly 0 and the block is the
    identity. Every key loads, and a tool that did read the last layer would get diffusers' output bit for bit.
    diffusers' converter skips this block (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)."""
    blocks = {int(k.split(".")[2]) for k in tower if k.startswith("transformer.resblocks.")}
    if len(blocks) != OPEN_CLIP_H_BLOCKS - 1:  # a tiny test encoder, or a folder that already has all 24
        return tower
    last = max(blocks)
    head = f"transformer.resblocks.{last}."
    added = {f"transformer.resblocks.{last + 1}.{k[len(head):]}": torch.zeros_like(v)
             for k, v in tower.items() if k.startswith(head)}
    return {**tower, **added}


def original_to_diffusers(sd: dict[str, torch.Tensor], pipe) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own single-file converters (what `from_single_file` runs), per component."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    back = {"unet": convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config)),
            "vae": convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config))}
    layout = text_layout(pipe)
    if layout == "sdxl":
        back["text_encoder"] = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(CLIP_L_PREFIX)})
        back["text_encoder_2"] = convert_open_clip_checkpoint(pipe.text_encoder_2, sd, prefix=CLIP_G_PREFIX)
    elif layout == "sd2":
        back["text_encoder"] = convert_open_clip_checkpoint(pipe.text_encoder, sd, prefix=SD2_CLIP_PREFIX)
    else:
        back["text_encoder"] = convert_ldm_clip_checkpoint({k: v for k, v in sd.items()
                                                           if k.startswith(SD1_CLIP_PREFIX)})
    for name in ("text_encoder", "text_encoder_2"):  # as from_single_file does for a flattened CLIPTextModel
        if name in back and not hasattr(getattr(pipe, name), "text_model"):
            back[name] = {k.removeprefix("text_model."): v for k, v in back[name].items()}
    return back


# the keys diffusers' from_single_file recognises each layout's text encoders by
TEXT_MARKERS = {"sdxl": ("clip_sdxl", "open_clip_sdxl"), "sd2": ("open_clip",), "sd1": ("clip",)}


def verify_round_trip(sd: dict[str, torch.Tensor], pipe) -> int:
    """Convert `sd` back with diffusers' converters; every tensor of every component must come back bitwise.
    Returns the number of tensors checked."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    for marker in TEXT_MARKERS[text_layout(pipe)]:
        if CHECKPOINT_KEY_NAMES[marker] not in sd:
            raise NitroFusionError(f"single-file export lacks '{CHECKPOINT_KEY_NAMES[marker]}'")
    return components_match(original_to_diffusers(sd, pipe), pipe)


def components_match(back: dict[str, dict[str, torch.Tensor]], pipe) -> int:
    """Every component diffusers' converters gave back must be the pipeline's own, key for key, dtype and bits
    (any family). Returns the number of tensors checked."""
    checked = 0
    for name, converted in back.items():
        own = {k: v for k, v in getattr(pipe, name).state_dict().items() if not k.endswith("position_ids")}
        check_same_layout(own, converted, f"the single file's {name} (converted back by diffusers)",
                          f"the exported {name}")
        bad = [k for k in own if own[k].dtype != converted[k].dtype or not torch.equal(own[k], converted[k])]
        if bad:
            raise NitroFusionError(f"single-file round trip is not exact: {len(bad)} {name} tensors differ "
                                   f"(e.g. '{bad[0]}')")
        checked += len(own)
    return checked


def architecture(pipe) -> str:
    """modelspec.architecture (the Stability AI model-spec names that A1111 and ComfyUI read)."""
    layout = text_layout(pipe)
    if layout == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if layout == "sd1":
        return "stable-diffusion-v1"
    v = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    return f"stable-diffusion-v2-{'768-v' if v else '512'}"


def single_file_out(out: str | Path) -> Path:
    """`export --format single-file`'s --out, checked before anything loads (every family)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise NitroFusionError(f"single-file export writes a .safetensors file; --out {out} has another suffix")
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    return out


def write_single_file(out: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The single file, written whole or not at all (staged_output)."""
    from safetensors.torch import save_file

    with staged_output(out, tensor_bytes(sd)) as tmp:
        save_file(sd, str(tmp), metadata=metadata)


def flow_sampling_note(shift: int, guidance: str) -> str:
    """The DiT families' `nitrofusion.sampling` metadata: how the file samples (docs/method.md §8)."""
    return (f"TimestepShiftFlowScheduler, shifted_timestep={shift}: 1-4 steps on the LCM grid {{999, 749, 499, 249}}, "
            f"the network called at t*shift/1000, x0 = x - sigma v, re-noised to the next unshifted t; {guidance}")


def export_single_file(model: str | Path, out: str | Path, base: str | Path | None = None,
                       shift: int | None = None, dtype: torch.dtype | None = None) -> dict:
    out = single_file_out(out)
    pipe = load_pipeline(model, base=base, shift=shift, dtype=dtype)
    sd = pipeline_to_original(pipe)
    checked = verify_round_trip(sd, pipe)
    shift_used = pipe.scheduler.config.shifted_timestep
    meta = {SHIFT_METADATA_KEY: str(shift_used), "modelspec.architecture": architecture(pipe),
            "nitrofusion.sampling": f"TimestepShiftLCMScheduler, shifted_timestep={shift_used}, "
                                    "original_inference_steps=4, 1-4 steps, guidance scale 0"}
    write_single_file(out, sd, meta)
    return {"path": str(out), "tensors": len(sd), "round_trip_checked": checked, "shift": shift_used,
            "architecture": meta["modelspec.architecture"]}


# ---- LoRA: truncated SVD of student - base --------------------------------------------------------------------


UNET_LORA_COVERAGE = ("every Linear and Conv2d of the UNet (attention q/k/v/out, feed-forward, proj_in/out, resnet "
                      "convs and time projections, down/upsamplers, conv_in/out, time/add embeddings)")


def lora_from_delta(student: torch.nn.Module, base: torch.nn.Module, rank: int, device: str | torch.device = "cpu",
                    what: str = "UNet", coverage: str = UNET_LORA_COVERAGE) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT LoRA factors (`{module}.lora_A.weight`, `.lora_B.weight`, scale alpha/r = 1) approximating
    student - base on every Linear and Conv2d, by truncated SVD in float64 (Eckart-Young: the best rank-r
    approximation per layer). Layers narrower than `rank` are zero-padded to it, so one rank (and alpha) holds for
    every layer and any LoRA loader reads it the same way; an unchanged layer gets none. Returns the factors and the
    error report. `what` names the two models in a layout mismatch ("the student UNet does not match the base
    UNet"); `coverage` is the report's description of the layers covered (the UNet's by default)."""
    if rank < 1:
        raise NitroFusionError(f"--rank must be >= 1 (got {rank})")
    s_sd, b_sd = student.state_dict(), base.state_dict()
    check_same_layout(b_sd, s_sd, f"the student {what}", f"the base {what}")
    layers = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    lora: dict[str, torch.Tensor] = {}
    covered_keys: set[str] = set()
    energy = {"covered": 0.0, "covered_residual": 0.0, "uncovered": 0.0}
    for name, module in layers.items():
        key = f"{name}.weight"
        covered_keys.add(key)
        delta = (s_sd[key].double() - b_sd[key].double()).to(device)
        if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
            covered_keys.discard(key)  # PEFT's conv LoRA is ungrouped: counted below as uncovered
            continue
        total = float(delta.square().sum())
        if total == 0.0:
            continue  # an unchanged layer needs no LoRA
        mat = delta.reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        k = min(rank, s.numel())
        energy["covered"] += total
        energy["covered_residual"] += float(s[k:].square().sum())
        root = s[:k].sqrt()
        b = torch.zeros(mat.shape[0], rank, dtype=torch.float64, device=device)
        a = torch.zeros(rank, mat.shape[1], dtype=torch.float64, device=device)
        b[:, :k], a[:k] = u[:, :k] * root, root[:, None] * vh[:k]
        if isinstance(module, torch.nn.Conv2d):  # PEFT: lora_A is the kxk conv, lora_B a 1x1 conv
            a, b = a.reshape(rank, *delta.shape[1:]), b[:, :, None, None]
        dtype = s_sd[key].dtype
        lora[f"{name}.lora_A.weight"] = a.to("cpu", dtype).contiguous()
        lora[f"{name}.lora_B.weight"] = b.to("cpu", dtype).contiguous()
    for key in s_sd:  # norms, biases and anything else LoRA cannot hold
        if key not in covered_keys:
            energy["uncovered"] += float((s_sd[key].double() - b_sd[key].double()).square().sum())
    all_energy = energy["covered"] + energy["uncovered"]
    report = {
        "rank": rank,
        "lora_layers": len(lora) // 2,
        "lora_parameters": sum(v.numel() for v in lora.values()),
        "covered_modules": coverage,
        "relative_error_covered": (energy["covered_residual"] / energy["covered"]) ** 0.5 if energy["covered"] else 0.0,
        "relative_error_total": ((energy["covered_residual"] + energy["uncovered"]) / all_energy) ** 0.5
        if all_energy else 0.0,
        "uncovered_fraction": energy["uncovered"] / all_energy if all_energy else 0.0,
        "delta_norm": all_energy ** 0.5,
    }
    return lora, report


KOHYA_LORA_FILE = "kohya_lora.safetensors"
PEFT_LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for the PEFT-format file
LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig in that file's header


def lora_to_kohya(lora: dict[str, torch.Tensor], unet_config, rank: int,
                  alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The same factors under the kohya / sd-scripts names that A1111, Forge and ComfyUI read:
    `lora_unet_{module path, dots as underscores}.lora_down.weight` (= PEFT's lora_A), `.lora_up.weight`
    (= lora_B) and `.alpha` (kohya's scale is alpha/rank, as PEFT's; alpha defaults to the rank: scale 1). The
    module path is the original layout's for SDXL and diffusers' own for SD 1.x/2.x, as sd-scripts writes them."""
    modules = [k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")]
    weights = {f"{m}.weight": lora[f"{m}.lora_A.weight"] for m in modules}
    sdxl = family_of_unet_config(dict(unet_config)) is SDXL
    renamed = _remap(weights, unet_module_map(unet_config), "LoRA") if sdxl else weights
    out: dict[str, torch.Tensor] = {}
    for module, orig in zip(modules, renamed, strict=True):  # _remap keeps the order
        stem = "lora_unet_" + orig.removesuffix(".weight").replace(".", "_")
        out[f"{stem}.lora_down.weight"] = lora[f"{module}.lora_A.weight"]
        out[f"{stem}.lora_up.weight"] = lora[f"{module}.lora_B.weight"]
        out[f"{stem}.alpha"] = torch.tensor(float(alpha or rank), dtype=lora[f"{module}.lora_A.weight"].dtype)
    return out


def save_transformer_lora(pipeline_cls, folder: Path, factors: dict[str, torch.Tensor], shift: int | None,
                          metadata: dict) -> None:
    """A DiT family's LoRA (SD3, FLUX): `factors` (PEFT keys, `{module}.lora_A.weight`) and their LoraConfig written
    by the family's own diffusers saver (`pipeline_cls.save_lora_weights`: keys `transformer.<module>.lora_A/B.weight`,
    the config under `lora_adapter_metadata`), the shift added to the header it wrote. An alpha other than the rank
    is folded into lora_B (alpha := rank): ComfyUI reads alpha only from `.alpha` tensors, which this format has none
    of, so it would apply the factors at scale 1 (scripts/check_comfyui_sd3.py); folded, every loader applies the
    same product (exact when alpha/rank is a power of two, else one rounding per entry)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    rank, alpha = metadata.get("r"), metadata.get("lora_alpha")
    if rank and alpha and float(alpha) != float(rank):
        scale = float(alpha) / float(rank)
        factors = {k: (v.float() * scale).to(v.dtype) if k.endswith(".lora_B.weight") else v
                   for k, v in factors.items()}
        metadata = {**metadata, "lora_alpha": rank}
    pipeline_cls.save_lora_weights(folder, transformer_lora_layers=factors, safe_serialization=True,
                                   transformer_lora_adapter_metadata=dict(metadata))
    if shift is None:
        return
    path = Path(folder) / PEFT_LORA_FILE
    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata() or {})
    header[SHIFT_METADATA_KEY] = str(shift)
    save_file(load_file(str(path)), str(path), metadata=header)


def trained_lora_dir(ref) -> Path | None:
    """A LoRA student's adapters (run/student/lora, written by the trainer), if the model is such a run."""
    from ...models.student import LORA_DIR

    folder = ref.student_dir / LORA_DIR if ref.student_dir is not None else None
    return folder if folder is not None and (folder / PEFT_LORA_FILE).is_file() else None


def export_trained_lora(ref, lora_dir: Path, out: Path, dtype: torch.dtype | None) -> dict:
    """A LoRA run's adapters, handed on without approximation: the same factors, rank, alpha and targets
    (diffusers' adapter metadata), written again so --dtype applies and the kohya file matches."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = lora_dir / PEFT_LORA_FILE
    factors = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    with safe_open(str(path), "pt") as f:
        packed = json.loads((f.metadata() or {}).get(LORA_METADATA_KEY, "{}"))  # flat: "unet.r", "unet.lora_alpha"
    meta = {k.removeprefix("unet."): v for k, v in packed.items() if k.startswith("unet.")}
    rank, alpha = int(meta.get("r", 0)), float(meta.get("lora_alpha", 0))
    if not rank:
        raise NitroFusionError(f"{path} lacks its adapter settings (rank, alpha); re-run the training's last step")
    if dtype is not None:
        factors = {k: v.to(dtype) for k, v in factors.items()}
    unet_config = UNet2DConditionModel.load_config(unet_folder(ref))
    shift = load_scheduler(ref).config.shifted_timestep if ref.scheduler_dir is not None else None
    report = {"source": "the run's trained LoRA adapters (exact)", "rank": rank, "alpha": alpha,
              "targets": meta.get("target_modules"), "lora_layers": len(factors) // 2,
              "lora_parameters": sum(v.numel() for v in factors.values())}
    with staged_output(out, 2 * tensor_bytes(factors)) as tmp:  # PEFT and kohya files
        save_lora_files(tmp, factors, unet_config, rank, shift, alpha=alpha, metadata=meta)
        (tmp / "lora_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def lora_export_source(model: str | Path, out: Path, rank: int | None,
                       base: str | Path | None) -> tuple[ModelRef, Path | None]:
    """`export --format lora`'s checks before any weights load, for every family: the model resolved, and its trained
    LoRA folder (a LoRA run, handed on exactly: no --rank) or None (a full student: the caller needs --rank)."""
    if rank is not None and rank < 1:
        raise NitroFusionError(f"--rank must be >= 1 (got {rank})")
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    ref = resolve(model, base)
    trained = trained_lora_dir(ref)
    if trained is not None and rank is not None:
        raise NitroFusionError(f"{model} trained LoRA adapters, which export hands on exactly; drop --rank (an SVD of "
                               "its merged weights would only approximate them)")
    return ref, trained


def export_lora(model: str | Path, out: str | Path, rank: int | None = None, base: str | Path | None = None,
                dtype: torch.dtype | None = None, device: str = "cpu") -> dict:
    """out/pytorch_lora_weights.safetensors (diffusers/PEFT keys: `pipe.load_lora_weights(out)` into a pipeline of
    the base SDXL folder, the run's teacher folder unless --base), out/kohya_lora.safetensors (the same factors
    under kohya names, for A1111 / ComfyUI) and lora_report.json. A LoRA run hands on its trained adapters; any
    other model needs `rank`: its LoRA is a truncated SVD of student - base."""
    from diffusers import UNet2DConditionModel

    out = Path(out)
    ref, trained = lora_export_source(model, out, rank, base)
    if trained is not None:
        return export_trained_lora(ref, trained, out, dtype)
    if rank is None:
        raise NitroFusionError(f"{model} is a full student: its LoRA is a truncated SVD of student - base; give "
                               "--rank N (e.g. 64; the report states the error)")
    base_dir = need_base(ref, "a LoRA (student - base)")
    # each UNet in the dtype it is stored in (the delta is taken per layer in float64, so nothing is lost): two
    # fp16 SDXL UNets take 10 GB, two fp32 ones 21 GB
    student = load_unet(ref, stored_dtype(unet_folder(ref)))
    with quiet_loading():
        base_unet = UNet2DConditionModel.from_pretrained(base_dir / "unet", dtype=stored_dtype(base_dir / "unet"))
    lora, report = lora_from_delta(student, base_unet, rank, device)
    if dtype is not None:
        lora = {k: v.to(dtype) for k, v in lora.items()}
    report["base"] = str(base_dir)
    # the run's shift rides along, so `generate --model kohya_lora.safetensors --base SDXL` needs no --shift
    shift = load_scheduler(ref).config.shifted_timestep if ref.scheduler_dir is not None else None
    with staged_output(out, 2 * tensor_bytes(lora)) as tmp:  # PEFT and kohya files
        save_lora_files(tmp, lora, base_unet.config, rank, shift)
        (tmp / "lora_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def save_lora_files(folder: Path, lora: dict[str, torch.Tensor], unet_config, rank: int,
                    shift: int | None = None, alpha: float | None = None, metadata: dict | None = None) -> None:
    """PEFT factors (`{module}.lora_A.weight` / `.lora_B.weight`, scale alpha/rank, 1 unless `alpha`) as diffusers'
    pytorch_lora_weights.safetensors and as the kohya-style file. `metadata`: the adapter's LoraConfig, stored
    as diffusers does so `load_lora_weights` rebuilds the same adapter (rank, alpha, targets)."""
    from safetensors.torch import save_file

    family = family_of_unet_config(dict(unet_config))
    family.pipeline_class().save_lora_weights(folder, unet_lora_layers=lora, safe_serialization=True,
                                              unet_lora_adapter_metadata=metadata)
    alpha = alpha or rank
    if family is SDXL:
        version, arch = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"
    elif unet_config["use_linear_projection"]:
        version, arch = "sd_v2", "stable-diffusion-v2/lora"
    else:
        version, arch = "sd_v1", "stable-diffusion-v1/lora"
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
            "ss_base_model_version": version, "modelspec.architecture": arch}
    if shift is not None:
        meta[SHIFT_METADATA_KEY] = str(shift)
    save_file(lora_to_kohya(lora, unet_config, rank, alpha), str(folder / KOHYA_LORA_FILE), metadata=meta)


# ---- transfer: theta_C + (theta_S - theta_B) ------------------------------------------------------------------


def role_model(path: str | Path, role: str) -> ModelRef:
    """One of transfer's --student / --base / --custom, resolved (a Hub id from the local cache) and classified."""
    path = local_model(path, f"--{role}")
    if not path.exists():
        raise NitroFusionError(f"--{role} not found: {path}")
    try:
        return ModelRef(model_kind(path), path)
    except NitroFusionError as e:
        raise NitroFusionError(f"--{role}: {e}") from None


def delta_sum(states: dict[str, dict[str, torch.Tensor]], roles: dict[str, Path],
              dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """custom + (student - base) in fp32 key by key, in this order (docs/method.md §6), once all three have the
    same keys and shapes. The inputs are emptied as it goes, so the peak stays near three models, not four."""
    s, b, c = states["student"], states["base"], states["custom"]
    check_same_layout(s, b, f"--base {roles['base']}", f"--student {roles['student']}")
    check_same_layout(s, c, f"--custom {roles['custom']}", f"--student {roles['student']}")
    result = {}
    for k in list(s):
        value = c.pop(k).float() + (s.pop(k).float() - b.pop(k).float())
        result[k] = value if dtype is None else value.to(dtype)
    return result


def save_weights_file(path: Path, state: dict[str, torch.Tensor], shift: int | None,
                      metadata: dict[str, str] | None = None) -> None:
    """A transfer result as one .safetensors file, the student's shift (and, for FLUX, its embedded guidance) in its
    metadata (what generate reads)."""
    from safetensors.torch import save_file

    meta = {**({SHIFT_METADATA_KEY: str(shift)} if shift is not None else {}), **(metadata or {})}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta or None)


def _read_unet_state(path: Path, role: str) -> tuple[dict[str, torch.Tensor], dict | None, Path | None]:
    """(state dict, UNet config or None, shifted-scheduler folder or None) of a run, student, pipeline or UNet
    folder, or a weights file (diffusers keys, or original layout: converted once a config is known)."""
    ref = role_model(path, role)
    path = ref.path
    if ref.kind == "file":
        state, _ = read_weights_file(path)
        return state, None, None
    unet = load_unet(ref)
    return unet.state_dict(), dict(unet.config), ref.scheduler_dir


def transfer(student: str | Path, base: str | Path, custom: str | Path, out: str | Path,
             dtype: torch.dtype | None = None) -> dict:
    """theta_custom + (theta_student - theta_base), computed in fp32 key by key (docs/method.md §6). `out` is a
    student folder (unet/ + the student's scheduler/ when it has one), or a diffusers-key .safetensors file."""

    out = Path(out)
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    roles = {"student": Path(student), "base": Path(base), "custom": Path(custom)}
    read = {role: _read_unet_state(path, role) for role, path in roles.items()}
    config = next((read[r][1] for r in ("custom", "student", "base") if read[r][1] is not None), None)
    states = {}
    for role, (state, _, _) in read.items():
        if is_original_layout(state):
            if config is None:
                raise NitroFusionError(f"--{role} {roles[role]} is an original-layout checkpoint; give at least one "
                                       "of --student/--base/--custom as a folder so its UNet config is known")
            state = to_diffusers_unet_keys(state, config)
        else:
            state = {k.removeprefix("unet."): v for k, v in state.items()}
        states[role] = state
    result = delta_sum(states, roles, dtype)
    sched_dir = read["student"][2]
    shift = json.loads((sched_dir / "scheduler_config.json").read_text())["shifted_timestep"] if sched_dir else None
    with staged_output(out, tensor_bytes(result)) as tmp:
        if out.suffix == ".safetensors":
            save_weights_file(tmp, result, shift)
        else:
            if config is None:
                raise NitroFusionError("no UNet config among --student/--base/--custom (all are weights files): "
                                       "give one of them as a folder, or --out FILE.safetensors")
            unet = unet_from_state(config, result, "(transfer result)", dtype=dtype or torch.float32)
            with quiet_loading():
                unet.save_pretrained(tmp / "unet", safe_serialization=True)
            if sched_dir is not None:
                shutil.copytree(sched_dir, tmp / "scheduler")
    return {"path": str(out), "tensors": len(result), "shift": shift}


def export(model: str | Path, fmt: str, out: str | Path, base: str | Path | None = None, shift: int | None = None,
           rank: int | None = None, dtype: torch.dtype | None = None, device: str = "cpu") -> dict:
    if fmt not in FORMATS:
        raise NitroFusionError(f"unknown export format {fmt!r}: choose diffusers, single-file or lora")
    if fmt == "diffusers":
        return {"path": str(export_diffusers(model, out, base, shift, dtype))}
    if fmt == "single-file":
        return export_single_file(model, out, base, shift, dtype)
    return export_lora(model, out, rank, base, dtype, device)
