"""ComfyUI's side of scripts/check_comfyui_flux.py: run with ComfyUI's Python. Reads our FLUX single file (the BFL
layout), asks ComfyUI's model detection what it is, builds ComfyUI's own FLUX network (comfy.ldm.flux.model.Flux) at
the size given by --params (ComfyUI hard-codes FLUX.1's width, heads and text width, so a small FLUX is detected as
FLUX.1 but cannot be built from the keys alone), loads the file into it strictly, and writes its velocity on the
given inputs. Imports nothing from nitrofusion."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--params", required=True, help="JSON: FluxParams of the model")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(a.comfyui).resolve()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management loads: no GPU here
    import comfy.model_detection
    import comfy.ops
    import comfy.utils
    import torch
    from comfy.ldm.flux.model import Flux
    from safetensors.torch import load_file, save_file

    sd = comfy.utils.load_torch_file(a.checkpoint)
    detected = comfy.model_detection.detect_unet_config(sd, "")
    config = comfy.model_detection.model_config_from_unet(sd, "")
    report = {"detected_unet_config": {k: v for k, v in detected.items() if isinstance(v, int | float | str | list)},
              "model_config": type(config).__name__ if config is not None else None}
    model = Flux(**json.loads(a.params), operations=comfy.ops.disable_weight_init).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    report.update(missing=list(missing), unexpected=list(unexpected))
    inp = load_file(a.inputs)
    with torch.no_grad():
        v = model(inp["x"], inp["sigma"], inp["context"], y=inp["pooled"], guidance=inp["guidance"])
    save_file({"velocity": v.float().contiguous()}, a.out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
