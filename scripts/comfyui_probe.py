"""ComfyUI's side of scripts/check_comfyui.py: run with a Python that can import ComfyUI (its own venv).

Loads our single-file export through ComfyUI's checkpoint loader, applies the authors' Timestep Shift
Model node, and writes what ComfyUI computes (UNet outputs, a 1-step sample, a VAE decode, LoRA-patched
UNet outputs) plus what ComfyUI reported while loading (detected model, missing / unexpected / left-over
keys, LoRA keys not applied). It imports nothing from nitrofusion: only ComfyUI, torch and safetensors.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import sys
from pathlib import Path


class Recorder(logging.Handler):
    """Every message ComfyUI logs while loading (its only report of keys it could not place)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))

    def take(self) -> list[tuple[int, str]]:
        out, self.messages = self.messages, []
        return out


def keys_reported(messages: list[tuple[int, str]], *prefixes: str, level: int = logging.DEBUG) -> list[str]:
    return [m[:300] for lvl, m in messages if m.startswith(prefixes) and lvl >= level]


def unet_call(base_model, inp, y):
    """The UNet at t = 249 on the check's fixed input, in ComfyUI's compute dtype."""
    import torch

    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    cast = {"dtype": dtype}
    with torch.autocast("cpu", enabled=False):
        return base_model.diffusion_model(inp["x"].to(**cast), inp["t249"], context=inp["context"].to(**cast),
                                          y=None if y is None else y.to(**cast)).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    ap.add_argument("--node", required=True, help="a checkout of the authors' ComfyUI-TimestepShiftModel")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True, help="safetensors written by check_comfyui.py")
    ap.add_argument("--lora", action="append", default=[], help="NAME=FILE, repeatable")
    ap.add_argument("--shift", type=int, required=True)
    ap.add_argument("--family", default="sdxl", choices=["sdxl", "sd15", "sd2"])
    ap.add_argument("--out", required=True, help="safetensors of ComfyUI's outputs; a .json report beside it")
    args = ap.parse_args()

    sys.path.insert(0, args.comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management reads it: this machine has no GPU
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    recorder = Recorder()
    for handler in logging.getLogger().handlers:  # ComfyUI's console handler: warnings only, the rest is recorded
        handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(recorder)
    logging.getLogger().setLevel(logging.DEBUG)
    report: dict = {"comfyui": args.comfyui}

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)
    messages = recorder.take()
    base_model = model.model
    report["detected"] = type(base_model.model_config).__name__
    report["model_type"] = base_model.model_type.name
    report["unet_dtype"] = str(base_model.get_dtype())
    # ComfyUI itself demotes a CLIP "missing" list holding only logit_scale / CLIP-L's text_projection (which
    # the original SDXL files lack too) to a debug line; any other missing key is a warning
    report["load_problems"] = (keys_reported(messages, "unet missing", "unet unexpected", "clip unexpected",
                                             "Missing VAE keys", "Leftover VAE keys", "left over keys", "no CLIP")
                               + keys_reported(messages, "clip missing", level=logging.WARNING))
    report["benign"] = [m for m in keys_reported(messages, "clip missing") if m not in report["load_problems"]]
    report["clip_models"] = sorted(n for n, _ in clip.cond_stage_model.named_children()) if clip else []

    inp = load_file(args.inputs)
    out: dict[str, torch.Tensor] = {}
    xl = args.family == "sdxl"
    size = dict(width=int(inp["size"][1]), height=int(inp["size"][0]))
    y = base_model.encode_adm(pooled_output=inp["pooled"], **size) if xl else None  # SD 1.x/2.x: no vector input
    if y is not None:
        out["y"] = y
    dtype = base_model.get_dtype()
    with torch.no_grad():
        for name in ("t999", "t249"):
            t = inp[name]
            out[f"unet_{name}"] = base_model.diffusion_model(inp["x"].to(dtype), t, context=inp["context"].to(dtype),
                                                             y=None if y is None else y.to(dtype)).float()

        # one sampling step through the authors' node, as their workflow does (lcm sampler, cfg 1)
        spec = importlib.util.spec_from_file_location("timestep_shift_node", Path(args.node) / "node.py")
        node = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(node)
        shifted = node.TimestepShiftModel().shift_model_timestep(model.clone(), args.shift)[0]
        cond = [[inp["context"], {"pooled_output": inp["pooled"], **size} if xl else {}]]
        latent = torch.zeros_like(inp["noise"])
        sample = comfy.sample.sample(shifted, inp["noise"], 1, 1.0, "lcm", "sgm_uniform", cond, cond, latent,
                                     disable_pbar=True, seed=0)
        out["sample_1step"] = sample.float()  # ComfyUI's latent space: already divided by the scaling factor
        out["vae_decode"] = vae.decode(inp["vae_latent"]).float()  # [B, H, W, 3] in [0, 1]
        names = {"sdxl": ("clip_l", "clip_g"), "sd15": ("clip_l",), "sd2": ("clip_h",)}[args.family]
        for name in names:  # last hidden state for the same token ids (tokenizers differ)
            encoder = getattr(clip.cond_stage_model, name).transformer
            out[f"text_{name}"] = encoder(input_tokens=inp["token_ids"].long(), dtype=torch.float32)[0].float()

    # LoRAs: ComfyUI patches a copy of every weight it changes, so the fp32 UNet would be held twice (21 GB).
    # Reload the UNet alone with fp16 weights (computed in fp32 by ComfyUI's manual cast) and patch that.
    del model, shifted, clip, vae, base_model
    gc.collect()
    if not args.lora:
        save_file({k: v.contiguous() for k, v in out.items()}, args.out)
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        return
    model = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=False,
                                                  model_options={"dtype": torch.float16})[0]
    recorder.take()
    with torch.no_grad():
        m = model.model
        out["lora_base_t249"] = unet_call(m, inp, y)
        for item in args.lora:
            name, path = item.split("=", 1)
            lora = comfy.utils.load_torch_file(path)
            patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
            not_loaded = keys_reported(recorder.take(), "lora key not loaded")
            patched.patch_model()
            out[f"lora_{name}_t249"] = unet_call(patched.model, inp, y)
            patched.unpatch_model()
            report[f"lora_{name}"] = {"keys": len(lora), "not_loaded": len(not_loaded), "examples": not_loaded[:5]}
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
