"""ComfyUI's side of scripts/check_comfyui_sd3.py: run with ComfyUI's Python. Loads the MMDiT of our SD3 single
file with ComfyUI's checkpoint loader, installs our node pack (comfyui/ComfyUI-NitroFusion) as ComfyUI would, and
writes what ComfyUI computes: the network's velocity on fixed inputs and the 1- and 4-step samples through the
nodes (SamplerCustom's path: the `lcm` sampler, CFG 1, the nodes' sigmas), in the model's latent space. With
--lora NAME=FILE: the same after ComfyUI's `LoraLoaderModelOnly` node (strength 1.0) on the loaded model, and what
ComfyUI made of the file's keys (mapped, patched, "lora key not loaded"). Imports nothing from nitrofusion."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from comfyui_lora import Recorder, apply_lora  # beside this script: its directory is on sys.path


def outputs(model, inp, pack, shift, fmt, prefix=""):
    """The velocity at t = 249 (the patcher's weights loaded as sampling loads them) and 1-/4-step samples."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import torch

    out = {}
    comfy.model_management.load_models_gpu([model])  # applies the patcher's weight patches (a LoRA's), if any
    out[prefix + "velocity_t249"] = model.model.diffusion_model(inp["x"], inp["t249"], context=inp["context"],
                                                                 y=inp["pooled"]).float()
    shifted = pack.NODE_CLASS_MAPPINGS["NitroFusionFlowTimestepShift"]().patch(model, shift)[0]
    cond = [[inp["context"], {"pooled_output": inp["pooled"]}]]
    for steps in (1, 4):
        sigmas = pack.NODE_CLASS_MAPPINGS["NitroFusionStudentSigmas"]().sigmas(steps)[0]
        samples = comfy.sample.sample_custom(shifted, inp["noise"], 1.0, comfy.samplers.sampler_object("lcm"),
                                             sigmas, cond, cond, torch.zeros_like(inp["noise"]), disable_pbar=True,
                                             seed=int(inp["seed"].item()))
        out[f"{prefix}sample_{steps}step"] = fmt.process_in(samples.float())  # back to the model's latent space
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--nodes", required=True, help="the ComfyUI-NitroFusion folder")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--shift", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora", action="append", default=[], help="NAME=FILE, repeatable")
    ap.add_argument("--whole", action="store_true", help="also load the file's CLIP-L / CLIP-G and VAE: what ComfyUI "
                    "reported while loading, the VAE's decode and both encoders' last hidden states on the inputs")
    args = ap.parse_args()

    sys.path.insert(0, args.comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.latent_formats
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import torch
    from safetensors.torch import load_file, save_file

    recorder = Recorder.install()

    spec = importlib.util.spec_from_file_location("ComfyUI_NitroFusion", Path(args.nodes) / "__init__.py",
                                                  submodule_search_locations=[args.nodes])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)  # as ComfyUI's custom_nodes loader imports a node folder

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        args.checkpoint, output_vae=args.whole, output_clip=args.whole, model_options={"dtype": torch.float32})
    warnings = list(recorder.warnings)  # ComfyUI itself logs a CLIP missing only logit_scale at debug level
    messages = recorder.take()
    base = model.model
    unet = base.model_config.unet_config  # what detection read from the keys (SD3.5's MMDiT-X: attn2 layers, RMS q/k)
    report = {"detected": type(base.model_config).__name__, "model_type": base.model_type.name,
              "mmdit": {k: unet.get(k) for k in ("depth", "x_block_self_attn_layers", "qk_norm")},
              "nodes": sorted(pack.NODE_CLASS_MAPPINGS)}
    inp = load_file(args.inputs)
    fmt = comfy.latent_formats.SD3()
    with torch.no_grad():
        out = outputs(model, inp, pack, args.shift, fmt)
        if args.whole:  # every key ComfyUI could not place is a log line: there must be none
            keys = ("unet missing", "unet unexpected", "clip missing", "clip unexpected", "Missing VAE keys",
                    "Leftover VAE keys", "left over keys", "no CLIP")
            report["load_problems"] = [m[:300] for m in warnings if m.startswith(keys)]
            report["benign"] = [m[:300] for m in messages if m.startswith(keys) and m not in warnings]
            report["clip_models"] = sorted(n for n, _ in clip.cond_stage_model.named_children())
            out["vae_decode"] = vae.decode(inp["vae_latent"]).float()  # [B, H, W, 3] in [0, 1], from a raw latent
            for name in ("clip_l", "clip_g"):  # last hidden state for the same token ids (tokenizers differ)
                encoder = getattr(clip.cond_stage_model, name).transformer
                out[f"text_{name}"] = encoder(input_tokens=inp["token_ids"].long(), dtype=torch.float32)[0].float()
        for item in args.lora:
            name, path = item.split("=", 1)
            patched, report[name] = apply_lora(model, path, recorder)
            out.update(outputs(patched, inp, pack, args.shift, fmt, prefix=f"{name}_"))
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
