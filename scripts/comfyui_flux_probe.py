"""ComfyUI's side of scripts/check_comfyui_flux.py: run with ComfyUI's Python. Reads our FLUX single file (the BFL
layout), asks ComfyUI's model detection what it is, builds ComfyUI's own FLUX model (comfy.model_base.Flux around
comfy.ldm.flux.model.Flux, through the config class detection picked) at the size given by --params (ComfyUI
hard-codes FLUX.1's width, heads and text width, so a small FLUX is detected as FLUX.1 but cannot be built from the
keys alone), loads the file into it strictly, and writes its velocity on the given inputs. With --lora NAME=FILE:
the same model after ComfyUI's `LoraLoaderModelOnly` node (strength 1.0; comfy.sd.load_lora_for_models: the key map
of comfy.lora.model_lora_keys_unet, comfy.lora.load_lora, ModelPatcher.add_patches), and what ComfyUI made of the
file's keys (mapped, patched, "lora key not loaded"). With --nodes: also the 1- and 4-step samples of each model
through our node pack (comfyui/ComfyUI-NitroFusion, installed as ComfyUI installs a custom node folder):
SamplerCustom's path (the `lcm` sampler, CFG 1, the nodes' sigmas), the student's guidance in the conditioning as the
FluxGuidance node puts it, in the model's latent space. Writes OUT (tensors) and OUT with .json (the report). Imports
nothing from nitrofusion."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from comfyui_lora import Recorder, apply_lora  # beside this script: its directory is on sys.path


def velocity(patcher, inp):
    """The network's velocity with the patcher's weights loaded as sampling loads them (its LoRA patches applied)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    return patcher.model.diffusion_model(inp["x"], inp["sigma"], inp["context"], y=inp["pooled"],
                                         guidance=inp["guidance"]).float().contiguous()


def node_pack(folder: str):
    """Our node folder imported as ComfyUI's custom_nodes loader imports one (a package from its __init__.py)."""
    spec = importlib.util.spec_from_file_location("ComfyUI_NitroFusion", Path(folder) / "__init__.py",
                                                  submodule_search_locations=[folder])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    return pack


def samples(patcher, inp, pack, shift: int, guidance: float) -> dict:
    """1- and 4-step samples through our nodes: the shift node on the model, the sigmas node into SamplerCustom's
    path with the `lcm` sampler and CFG 1; the guidance in the conditioning (what ComfyUI's FluxGuidance node sets);
    the result brought back to the model's latent space."""
    import comfy.sample
    import comfy.samplers
    import torch

    shifted = pack.NODE_CLASS_MAPPINGS["NitroFusionFlowTimestepShift"]().patch(patcher, shift)[0]
    cond = [[inp["context"], {"pooled_output": inp["pooled"], "guidance": guidance}]]
    out = {}
    for steps in (1, 4):
        sigmas = pack.NODE_CLASS_MAPPINGS["NitroFusionStudentSigmas"]().sigmas(steps)[0]
        got = comfy.sample.sample_custom(shifted, inp["noise"], 1.0, comfy.samplers.sampler_object("lcm"), sigmas,
                                         cond, cond, torch.zeros_like(inp["noise"]), disable_pbar=True,
                                         seed=int(inp["seed"].item()))
        out[f"sample_{steps}step"] = patcher.model.latent_format.process_in(got.float()).contiguous()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--params", required=True, help="JSON: FluxParams of the model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora", action="append", default=[], help="NAME=FILE, repeatable")
    ap.add_argument("--nodes", help="the ComfyUI-NitroFusion folder: also sample through its nodes, at the shift and "
                    "guidance the file's metadata names")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(a.comfyui).resolve()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management loads: no GPU here
    import comfy.lora
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    recorder = Recorder.install()

    sd = comfy.utils.load_torch_file(a.checkpoint)
    detected = comfy.model_detection.detect_unet_config(sd, "")
    config = comfy.model_detection.model_config_from_unet(sd, "")
    report = {"detected_unet_config": {k: v for k, v in detected.items() if isinstance(v, int | float | str | list)},
              "model_config": type(config).__name__ if config is not None else None}
    # the detected config with the true sizes: the same config class, its model and key maps at the tiny size
    config = comfy.model_detection.model_config_from_unet_config({**detected, **json.loads(a.params)}, sd)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(sd, "").eval()
    weights = config.process_unet_state_dict(dict(sd))
    missing, unexpected = model.diffusion_model.load_state_dict(weights, strict=False)
    report.update(built_as=f"{type(config).__name__} ({type(model).__module__}.{type(model).__name__})",
                  missing=list(missing), unexpected=list(unexpected))
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    inp = load_file(a.inputs)
    out = {}
    pack = node_pack(a.nodes) if a.nodes else None
    if pack is not None:  # what a user types into the shift node and FluxGuidance: the file's own metadata
        with safe_open(a.checkpoint, "pt") as f:
            meta = f.metadata()
        shift, guidance = int(meta["nitrofusion.shifted_timestep"]), float(meta["nitrofusion.guidance"])
        report.update(nodes=sorted(pack.NODE_CLASS_MAPPINGS), shifted_timestep=shift, guidance=guidance)
    with torch.no_grad():
        out["velocity"] = velocity(patcher, inp)
        if pack is not None:
            out.update(samples(patcher, inp, pack, shift, guidance))
        for item in a.lora:
            name, path = item.split("=", 1)
            patched, report[name] = apply_lora(patcher, path, recorder, mapping=True)
            out[f"{name}_velocity"] = velocity(patched, inp)
            if pack is not None:
                out.update({f"{name}_{k}": v for k, v in samples(patched, inp, pack, shift, guidance).items()})
            comfy.model_management.unload_all_models()  # the LoRA's patches taken off again: the next starts bare
        if a.lora:  # the bare model once more: the patches came off
            out["velocity_after_loras"] = velocity(patcher, inp)
    save_file(out, a.out)
    Path(a.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
