"""The stable-diffusion.cpp side of scripts/check_sdcpp.py: run with the Python that has the binding
(`stable-diffusion-cpp-python`, built from the registry's source distribution into its own venv).

Loads a single-file checkpoint with sd.cpp, samples each case of a JSON plan (prompt, size, seed, sampler,
custom sigmas, timestep shift, optional LoRA through sd.cpp's `<lora:NAME:1>` prompt syntax) and writes each
image as CASE.png beside probe.json (the binding's version, load and sampling times). sd.cpp logs to stderr.
Imports nothing of nitrofusion.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    plan = json.loads(args.plan.read_text())
    args.out.mkdir(parents=True, exist_ok=True)

    from stable_diffusion_cpp import StableDiffusion

    report: dict = {"binding": version("stable-diffusion-cpp-python"), "models": {}}
    for model in plan["models"]:  # one load per (checkpoint, weight type); every case of it samples from it
        start = time.time()
        sd = StableDiffusion(model_path=model["checkpoint"], lora_model_dir=model.get("lora_dir", ""),
                             wtype=model["wtype"], rng_type="cuda", sampler_rng_type="cuda",
                             n_threads=plan.get("threads", -1), verbose=True)  # its log goes to stderr
        info = {"load_s": round(time.time() - start, 1), "cases": {}}
        for case in model["cases"]:
            start = time.time()
            images = sd.generate_image(
                prompt=case["prompt"], negative_prompt="", width=case["width"], height=case["height"],
                seed=case["seed"], cfg_scale=case["cfg_scale"], sample_method=case["sample_method"],
                sample_steps=case["steps"], sigmas=case["sigmas"], timestep_shift=case["timestep_shift"])
            images[0].save(args.out / f"{case['name']}.png")
            info["cases"][case["name"]] = {"seconds": round(time.time() - start, 1)}
        report["models"][model["name"]] = info
        del sd
    (args.out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
