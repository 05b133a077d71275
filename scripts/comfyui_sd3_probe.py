"""ComfyUI's side of scripts/check_comfyui_sd3.py: run with ComfyUI's Python. Loads the MMDiT of our SD3 single
file with ComfyUI's checkpoint loader, installs our node pack (comfyui/ComfyUI-NitroFusion) as ComfyUI would, and
writes what ComfyUI computes: the network's velocity on fixed inputs and the 1- and 4-step samples through the
nodes (SamplerCustom's path: the `lcm` sampler, CFG 1, the nodes' sigmas), in the model's latent space. Imports
nothing from nitrofusion."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--nodes", required=True, help="the ComfyUI-NitroFusion folder")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--shift", type=int, required=True)
    ap.add_argument("--out", required=True)
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

    spec = importlib.util.spec_from_file_location("ComfyUI_NitroFusion", Path(args.nodes) / "__init__.py",
                                                  submodule_search_locations=[args.nodes])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)  # as ComfyUI's custom_nodes loader imports a node folder

    model = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=False,
                                                  model_options={"dtype": torch.float32})[0]
    base = model.model
    report = {"detected": type(base.model_config).__name__, "model_type": base.model_type.name,
              "nodes": sorted(pack.NODE_CLASS_MAPPINGS)}
    inp = load_file(args.inputs)
    fmt = comfy.latent_formats.SD3()
    out = {}
    with torch.no_grad():
        out["velocity_t249"] = base.diffusion_model(inp["x"], inp["t249"], context=inp["context"],
                                                    y=inp["pooled"]).float()
        shifted = pack.NODE_CLASS_MAPPINGS["NitroFusionFlowTimestepShift"]().patch(model, args.shift)[0]
        cond = [[inp["context"], {"pooled_output": inp["pooled"]}]]
        for steps in (1, 4):
            sigmas = pack.NODE_CLASS_MAPPINGS["NitroFusionStudentSigmas"]().sigmas(steps)[0]
            samples = comfy.sample.sample_custom(shifted, inp["noise"], 1.0, comfy.samplers.sampler_object("lcm"),
                                                 sigmas, cond, cond, torch.zeros_like(inp["noise"]),
                                                 disable_pbar=True, seed=int(inp["seed"].item()))
            out[f"sample_{steps}step"] = fmt.process_in(samples.float())  # back to the model's latent space
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
