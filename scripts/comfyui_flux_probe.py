"""ComfyUI's side of scripts/check_comfyui_flux.py: run with ComfyUI's Python. Reads our FLUX single file (the BFL
layout), asks ComfyUI's model detection what it is, builds ComfyUI's own FLUX model (comfy.model_base.Flux around
comfy.ldm.flux.model.Flux, through the config class detection picked) at the size given by --params (ComfyUI
hard-codes FLUX.1's width, heads and text width, so a small FLUX is detected as FLUX.1 but cannot be built from the
keys alone), loads the file into it strictly, and writes its velocity on the given inputs. With --lora NAME=FILE:
the same model after ComfyUI's `LoraLoaderModelOnly` node (strength 1.0; comfy.sd.load_lora_for_models: the key map
of comfy.lora.model_lora_keys_unet, comfy.lora.load_lora, ModelPatcher.add_patches), and what ComfyUI made of the
file's keys (mapped, patched, "lora key not loaded"). Writes OUT (tensors) and OUT with .json (the report). Imports
nothing from nitrofusion."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


class Recorder(logging.Handler):
    """ComfyUI's log: its only report of LoRA keys it could not place ("lora key not loaded: KEY")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> list[str]:
        out, self.messages = self.messages, []
        return out


def velocity(patcher, inp):
    """The network's velocity with the patcher's weights loaded as sampling loads them (its LoRA patches applied)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    return patcher.model.diffusion_model(inp["x"], inp["sigma"], inp["context"], y=inp["pooled"],
                                         guidance=inp["guidance"]).float().contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--params", required=True, help="JSON: FluxParams of the model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora", action="append", default=[], help="NAME=FILE, repeatable")
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
    from safetensors.torch import load_file, save_file

    recorder = Recorder()
    for handler in logging.getLogger().handlers:  # the console: warnings only, as ComfyUI shows them
        handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(recorder)
    logging.getLogger().setLevel(logging.DEBUG)

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
    with torch.no_grad():
        out["velocity"] = velocity(patcher, inp)
        if a.lora:
            import folder_paths
            import nodes  # ComfyUI's built-in nodes, LoraLoaderModelOnly among them

            key_map = comfy.lora.model_lora_keys_unet(model, {})
        for item in a.lora:
            name, path = item.split("=", 1)
            path = Path(path).resolve()
            folder_paths.add_model_folder_path("loras", str(path.parent.parent))  # as if in models/loras/NAME/
            tensors = comfy.utils.load_torch_file(str(path), safe_load=True)
            modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
            recorder.take()
            patched = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, f"{path.parent.name}/{path.name}",
                                                                       1.0)[0]
            log = recorder.take()
            patches = {k: len(v) - len(patcher.patches.get(k, [])) for k, v in patched.patches.items()}
            patches = {k: n for k, n in patches.items() if n}  # the weights this LoRA patches: module count each

            def target(m):  # a weight, a slice of a fused one (weight, (dim, offset, size)), or (weight, None, fn)
                t = key_map[m]
                if isinstance(t, str):
                    return t
                where = f"{t[0]}[{t[1][1]}:{t[1][1] + t[1][2]}]" if t[1] is not None else t[0]
                return where + (f" via {t[2].__name__}" if len(t) > 2 else "")

            report[name] = {
                "tensors": len(tensors), "modules": len(modules),
                "modules_mapped": sum(m in key_map for m in modules),
                "modules_patched": sum(patches.values()), "weights_patched": len(patches),
                "not_loaded": [m for m in log if m.startswith(("lora key not loaded", "NOT LOADED"))],
                "unmapped": [m for m in modules if m not in key_map],
                "mapping": {m.removeprefix("transformer."): target(m).removeprefix("diffusion_model.")
                            for m in modules if m in key_map}}
            out[f"{name}_velocity"] = velocity(patched, inp)
            comfy.model_management.unload_all_models()  # the LoRA's patches taken off again: the next starts bare
        if a.lora:  # the bare model once more: the patches came off
            out["velocity_after_loras"] = velocity(patcher, inp)
    save_file(out, a.out)
    Path(a.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
