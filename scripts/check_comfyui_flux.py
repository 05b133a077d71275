"""Does ComfyUI read our FLUX single file (`export --format single-file`, the BFL layout of flux1-dev.safetensors)
as FLUX, and compute the velocity our pipeline computes? Builds the tests' tiny random FLUX (3 double, 2 single
blocks, width 16), exports its transformer, and runs scripts/comfyui_flux_probe.py with ComfyUI's Python: ComfyUI's
detection of the file, and its own FLUX network (built at the tiny size: ComfyUI hard-codes FLUX.1's 3072 width, 24
heads and 4096-wide text, so it cannot size a small FLUX from the keys) loaded strictly from the file, against
`generate --model FILE --base FOLDER`'s transformer on the same packed inputs.

    python scripts/check_comfyui_flux.py --comfyui /work/ComfyUI --python /work/comfy-venv/bin/python --work /tmp/cf
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--python", required=True, help="ComfyUI's Python")
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    from nitrofusion.cli import main as cli
    from nitrofusion.worlds.flux.pipeline import load_pipeline
    from nitrofusion.worlds.flux.testing import build_random_flux
    from nitrofusion.worlds.flux.tokens import pack

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "teacher"
    if not folder.exists():
        build_random_flux(folder)
    path = work / "nitro-flux.safetensors"
    if not path.exists():
        assert cli(["export", str(folder), "--format", "single-file", "--shift", "250", "--out", str(path)]) == 0
    pipe = load_pipeline(path, base=folder)
    tr = pipe.transformer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    inp = {"x": x, "sigma": torch.tensor([0.249]), "guidance": torch.tensor([3.5]),
           "context": torch.randn(1, 16, 32, generator=gen), "pooled": torch.randn(1, 32, generator=gen)}
    save_file(inp, str(work / "inputs.safetensors"))
    img_ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    with torch.no_grad():
        packed = tr(hidden_states=pack(x), timestep=inp["sigma"], guidance=inp["guidance"],
                    pooled_projections=inp["pooled"], encoder_hidden_states=inp["context"],
                    txt_ids=torch.zeros(16, 3), img_ids=img_ids).sample
    cfg = tr.config
    params = dict(in_channels=cfg.in_channels // 4, out_channels=cfg.in_channels // 4,
                  vec_in_dim=cfg.pooled_projection_dim, context_in_dim=cfg.joint_attention_dim,
                  hidden_size=tr.inner_dim, mlp_ratio=4.0, num_heads=cfg.num_attention_heads, depth=cfg.num_layers,
                  depth_single_blocks=cfg.num_single_layers, axes_dim=list(cfg.axes_dims_rope), theta=10000,
                  patch_size=2, qkv_bias=True, guidance_embed=cfg.guidance_embeds)
    out = work / "comfy-velocity.safetensors"
    run = subprocess.run([a.python, str(Path(__file__).with_name("comfyui_flux_probe.py")), "--comfyui", a.comfyui,
                          "--checkpoint", str(path), "--inputs", str(work / "inputs.safetensors"), "--params",
                          json.dumps(params), "--out", str(out)], capture_output=True, text=True)
    if run.returncode:
        sys.exit(run.stderr[-3000:])
    report = json.loads(run.stdout.strip().splitlines()[-1])
    theirs = load_file(str(out))["velocity"]
    from nitrofusion.worlds.flux.tokens import unpack

    ours = unpack(packed, 8, 8)
    report["velocity_rel_l2"] = float((theirs - ours).norm() / ours.norm())
    report["velocity_bitwise"] = bool(torch.equal(theirs, ours))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
