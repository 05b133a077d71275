"""Does ComfyUI sample our SD3 students as `nitrofusion generate` does? A manual check, not part of CI (CI cannot
fetch ComfyUI); the node's arithmetic itself is tested in CI (tests/test_comfyui_node.py).

    python scripts/check_comfyui_sd3.py --comfyui ComfyUI --python comfy-venv/bin/python --work /tmp/comfy-sd3

1. builds a small random SD3 (2 joint blocks of width 128: ComfyUI reads an MMDiT's depth from its width, 64 per
   block, so the test suite's tiny SD3 is not one it can detect) and exports it with `export --format single-file`;
2. computes with our pipeline (the file loaded as `generate` loads it, fp32): the velocity at t = 249 on fixed
   inputs, and 1- and 4-step samples of our TimestepShiftFlowScheduler from a fixed x_T, re-noised with the draws
   ComfyUI's `lcm` sampler makes for the same seed;
3. runs scripts/comfyui_sd3_probe.py with ComfyUI's Python: ComfyUI's checkpoint loader, our node pack
   (comfyui/ComfyUI-NitroFusion), SamplerCustom's path with the `lcm` sampler and CFG 1;
4. compares (relative L2 error < 1e-5: the same fp32 arithmetic up to summation order), prints a table, writes
   WORK/report.json, exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATENT = (1, 16, 16, 16)
SEED = 7


def build(work: Path, shift: int) -> tuple[Path, Path]:
    from diffusers import SD3Transformer2DModel

    from nitrofusion.cli import main as cli
    from nitrofusion.worlds.sd3.testing import build_random_sd3, sd3_transformer_config

    base, single = work / "base", work / "model.safetensors"
    if not base.exists():
        build_random_sd3(base)
        torch.manual_seed(1)
        config = {**sd3_transformer_config(2), "attention_head_dim": 64, "num_attention_heads": 2,
                  "caption_projection_dim": 128}
        SD3Transformer2DModel(**config).save_pretrained(base / "transformer")
    if not single.exists():
        assert cli(["export", str(base), "--format", "single-file", "--shift", str(shift), "--out", str(single)]) == 0
    return base, single


def references(base: Path, single: Path, shift: int) -> tuple[dict, dict]:
    from nitrofusion.worlds.sd3.pipeline import load_pipeline

    gen = torch.Generator().manual_seed(0)
    inp = {"x": torch.randn(LATENT, generator=gen), "noise": torch.randn(LATENT, generator=gen),
           "context": torch.randn(1, 77, 32, generator=gen), "pooled": torch.randn(1, 64, generator=gen),
           "t249": torch.tensor([249.0]), "seed": torch.tensor([SEED])}
    pipe = load_pipeline(single, base=base, shift=shift, dtype=torch.float32)
    net = pipe.transformer
    ref = {}
    with torch.no_grad():
        ref["velocity_t249"] = net(hidden_states=inp["x"], timestep=inp["t249"], encoder_hidden_states=inp["context"],
                                   pooled_projections=inp["pooled"]).sample
        for steps in (1, 4):
            sch = pipe.scheduler
            sch.set_timesteps(steps)
            noises = torch.Generator().manual_seed(SEED)  # the lcm sampler's draws for this seed, in order
            x = inp["noise"].clone()
            for t in sch.timesteps:
                v = net(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=inp["context"],
                        pooled_projections=inp["pooled"]).sample
                x = sch.step(v, t, x, generator=noises).prev_sample
            ref[f"sample_{steps}step"] = x
    return inp, ref


def main() -> int:
    ap = argparse.ArgumentParser(description="check that ComfyUI samples nitrofusion's SD3 students")
    ap.add_argument("--comfyui", required=True, type=Path)
    ap.add_argument("--python", required=True, help="a Python that imports ComfyUI (e.g. its venv's)")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--shift", type=int, default=250)
    args = ap.parse_args()
    if not 1 <= args.shift <= 1000:
        ap.error(f"--shift {args.shift} is outside [1, 1000]")
    args.work.mkdir(parents=True, exist_ok=True)
    base, single = build(args.work, args.shift)
    inp, ref = references(base, single, args.shift)
    save_file({k: v.contiguous() for k, v in inp.items()}, str(args.work / "inputs.safetensors"))
    nodes = Path(__file__).resolve().parents[1] / "comfyui" / "ComfyUI-NitroFusion"
    subprocess.run([args.python, str(Path(__file__).with_name("comfyui_sd3_probe.py")), "--comfyui",
                    str(args.comfyui), "--nodes", str(nodes), "--checkpoint", str(single), "--inputs",
                    str(args.work / "inputs.safetensors"), "--shift", str(args.shift), "--out",
                    str(args.work / "comfy.safetensors")], check=True)
    got = load_file(str(args.work / "comfy.safetensors"))
    probe = json.loads((args.work / "comfy.json").read_text())
    rows = [{"check": "detected as SD3 (FLOW)", "ok": probe["detected"] == "SD3" and probe["model_type"] == "FLOW",
             "note": f"{probe['detected']} {probe['model_type']}"}]
    for key, want in ref.items():
        have = got[key]
        rel = float((have - want).norm() / want.norm())
        err = float((have - want).abs().max())
        rows.append({"check": key, "ok": rel < 1e-5, "rel_l2_err": rel, "max_abs_err": err})
    commit = subprocess.run(["git", "-C", str(args.comfyui), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    (args.work / "report.json").write_text(json.dumps({"comfyui_commit": commit, "shift": args.shift,
                                                       "probe": probe, "checks": rows}, indent=2) + "\n")
    print(f"ComfyUI {commit}\n| check | ok | detail |\n|---|---|---|")
    for r in rows:
        detail = r.get("note") or f"relative L2 {r['rel_l2_err']:.2e}, max abs {r['max_abs_err']:.2e}"
        print(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {detail} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
