"""Does ComfyUI read our FLUX single file (`export --format single-file`, the BFL layout of flux1-dev.safetensors)
as FLUX, and compute the velocity our pipeline computes? Builds the tests' tiny random FLUX (3 double, 2 single
blocks, width 16), exports its transformer, and runs scripts/comfyui_flux_probe.py with ComfyUI's Python: ComfyUI's
detection of the file, and its own FLUX model (built at the tiny size: ComfyUI hard-codes FLUX.1's 3072 width, 24
heads and 4096-wide text, so it cannot size a small FLUX from the keys) loaded strictly from the file, against
`generate --model FILE --base FOLDER`'s transformer on the same packed inputs.

The LoRA leg (report key "lora"): random non-zero rank-4 factors (alpha = rank) on every FLUX_LORA_TARGETS layer of
that FLUX (the double-stream blocks' attention of both streams and feed-forwards, the single-stream blocks' to_q/k/v
and proj_mlp), put on as the trainer puts them (`add_lora`) and saved by `save_lora_files` (what `export --format
lora` writes). Ours: `generate`'s path (`load_pipeline(FILE, base=FOLDER)`: diffusers' `load_lora_weights`, adapters
unfused). ComfyUI's: the base file in its tiny FLUX model, then its `LoraLoaderModelOnly` node at strength 1.0. The
same velocity, the file's modules that ComfyUI maps (comfy.lora.model_lora_keys_unet, whose FLUX part is
comfy.utils.flux_to_diffusers: to_q/k/v and add_q/k/v_proj land on slices of the fused img_attn/txt_attn qkv, the
single blocks' to_q/k/v and proj_mlp on slices of linear1) and patches, and every "lora key not loaded" it logs
(there must be none). Also the same factors saved with alpha = 2 x rank (save_lora_files folds alpha into lora_B,
since ComfyUI reads an alpha only from `.alpha` tensors): ComfyUI must match diffusers on that file too.

The sampling leg (report key "nodes", and each LoRA's "samples_through_the_nodes"): our node pack
(comfyui/ComfyUI-NitroFusion) on ComfyUI's model, at the shift and guidance the file's metadata names (what a user
types into the shift node and FluxGuidance), 1 and 4 steps through SamplerCustom's path with the `lcm` sampler and
CFG 1, against our pipeline's scheduler and transformer from the same x_T and the same re-noising draws.

    python scripts/check_comfyui_flux.py --comfyui /work/ComfyUI --python /work/comfy-venv/bin/python --work /tmp/cf

Prints the report (WORK/report.json, or --report), exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHIFT = 250
LORA_RANK = 4
LORA_SEED = 11
SEED = 7  # the lcm sampler's re-noising draws (ComfyUI seeds a CPU generator with it, and so do we)
NODES = Path(__file__).resolve().parents[1] / "comfyui" / "ComfyUI-NitroFusion"
TOL = 1e-5  # relative L2: the same fp32 arithmetic up to summation order


def build_lora(base: Path, folder: Path, alpha: float) -> Path:
    """Random non-zero factors on every FLUX_LORA_TARGETS layer, the same draws for every alpha, saved as the trainer
    and `export --format lora` save them."""
    from diffusers import FluxTransformer2DModel

    from nitrofusion.worlds.flux.config import FLUX_LORA_TARGETS
    from nitrofusion.worlds.flux.lora import save_lora_files
    from nitrofusion.worlds.pipelines.testing import random_lora

    path = folder / "pytorch_lora_weights.safetensors"
    if path.exists():
        return path
    net = FluxTransformer2DModel.from_pretrained(base / "transformer")
    factors, metadata = random_lora(net, LORA_RANK, alpha, FLUX_LORA_TARGETS, LORA_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    save_lora_files(folder, factors, SHIFT, metadata)
    return path


def references(model: Path, base: Path, inp: dict) -> tuple[dict, int]:
    """`generate --model FILE --base FOLDER`'s transformer and scheduler: the velocity on the packed inputs, and the
    1- and 4-step samples from x_T = inp["noise"] at the student's guidance, the scheduler's re-noising drawing from
    torch.Generator().manual_seed(seed) in the unpacked latent's shape (what ComfyUI's `lcm` sampler draws; FluxPipeline
    would draw them in its packed shape, the same numbers in other places). Also the count of LoRA modules."""
    from nitrofusion.worlds.flux.pipeline import load_pipeline
    from nitrofusion.worlds.flux.tokens import pack, unpack

    pipe = load_pipeline(model, base=base)
    tr = pipe.transformer
    img_ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)

    def velocity(x: torch.Tensor, sigma: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        packed = tr(hidden_states=pack(x), timestep=sigma, guidance=guidance, pooled_projections=inp["pooled"],
                    encoder_hidden_states=inp["context"], txt_ids=torch.zeros(16, 3), img_ids=img_ids).sample
        return unpack(packed, 8, 8)

    ref = {}
    with torch.no_grad():
        ref["velocity"] = velocity(inp["x"], inp["sigma"], inp["guidance"])
        guidance = torch.tensor([pipe.nitrofusion_guidance])
        for steps in (1, 4):
            sched = pipe.scheduler
            sched.set_timesteps(steps)
            noises = torch.Generator().manual_seed(int(inp["seed"].item()))
            x = inp["noise"].clone()
            for t in sched.timesteps:
                x = sched.step(velocity(x, t.expand(1) / 1000, guidance), t, x, generator=noises).prev_sample
            ref[f"sample_{steps}step"] = x
    lora_modules = sum(1 for n, _ in tr.named_modules() if n.endswith(".lora_A"))
    return ref, lora_modules


def compare(ref: dict, got: dict, prefix: str = "", bare: dict | None = None) -> dict:
    """Relative L2 errors of ComfyUI's tensors against ours; with `bare` (ours without the LoRA), the LoRA's effect
    and the error relative to it."""
    rows = {}
    for key, want in ref.items():
        have = got[prefix + key]
        row = {"rel_l2": float((have - want).norm() / want.norm()), "max_abs_err": float((have - want).abs().max())}
        if bare is not None:
            effect = want - bare[key]
            row["lora_effect_rel"] = float(effect.norm() / bare[key].norm())
            row["rel_err_of_effect"] = float((have - want).norm() / effect.norm())
        rows[key] = row
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--python", required=True, help="ComfyUI's Python")
    ap.add_argument("--work", required=True)
    ap.add_argument("--report", help="where to write the report (default WORK/report.json)")
    ap.add_argument("--comfyui-commit", help="ComfyUI's commit, for a source tree that is not a git checkout")
    a = ap.parse_args()
    from nitrofusion.cli import main as cli
    from nitrofusion.worlds.flux.pipeline import load_pipeline
    from nitrofusion.worlds.flux.testing import build_random_flux

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "teacher"
    if not folder.exists():
        build_random_flux(folder)
    path = work / "nitro-flux.safetensors"
    if not path.exists():
        assert cli(["export", str(folder), "--format", "single-file", "--shift", str(SHIFT), "--out", str(path)]) == 0
    loras = {"lora": build_lora(folder, work / "lora", float(LORA_RANK)),  # alpha = rank
             "lora_alpha2r": build_lora(folder, work / "lora_alpha2r", 2.0 * LORA_RANK)}
    gen = torch.Generator().manual_seed(0)
    inp = {"x": torch.randn(1, 16, 8, 8, generator=gen), "sigma": torch.tensor([0.249]),
           "guidance": torch.tensor([3.5]), "context": torch.randn(1, 16, 32, generator=gen),
           "pooled": torch.randn(1, 32, generator=gen), "noise": torch.randn(1, 16, 8, 8, generator=gen),
           "seed": torch.tensor([SEED])}
    save_file(inp, str(work / "inputs.safetensors"))
    ours, _ = references(path, folder, inp)
    ours_lora = {name: references(p, folder, inp) for name, p in loras.items()}
    tr = load_pipeline(path, base=folder).transformer
    cfg = tr.config
    params = dict(in_channels=cfg.in_channels // 4, out_channels=cfg.in_channels // 4,
                  vec_in_dim=cfg.pooled_projection_dim, context_in_dim=cfg.joint_attention_dim,
                  hidden_size=tr.inner_dim, mlp_ratio=4.0, num_heads=cfg.num_attention_heads, depth=cfg.num_layers,
                  depth_single_blocks=cfg.num_single_layers, axes_dim=list(cfg.axes_dims_rope), theta=10000,
                  patch_size=2, qkv_bias=True, guidance_embed=cfg.guidance_embeds)
    out = work / "comfy-velocity.safetensors"
    run = subprocess.run([a.python, str(Path(__file__).with_name("comfyui_flux_probe.py")), "--comfyui", a.comfyui,
                          "--checkpoint", str(path), "--inputs", str(work / "inputs.safetensors"), "--params",
                          json.dumps(params), "--out", str(out), "--nodes", str(NODES),
                          *[x for name, p in loras.items() for x in ("--lora", f"{name}={p}")]],
                         capture_output=True, text=True)
    if run.returncode:
        sys.exit(run.stderr[-3000:])
    probe = json.loads(out.with_suffix(".json").read_text())
    got = load_file(str(out))

    bare = compare(ours, got)
    report = {k: probe[k] for k in ("detected_unet_config", "model_config", "built_as", "missing", "unexpected")}
    report["velocity_rel_l2"] = bare["velocity"]["rel_l2"]
    report["velocity_bitwise"] = bool(torch.equal(got["velocity"], ours["velocity"]))
    report["velocity_after_loras_rel_l2"] = compare({"velocity_after_loras": ours["velocity"]}, got)[
        "velocity_after_loras"]["rel_l2"]  # the LoRAs' patches came off again
    report["nodes"] = {"pack": probe["nodes"], "shifted_timestep": probe["shifted_timestep"],
                       "guidance": probe["guidance"], "seed": SEED,
                       "sampled_with": "NitroFusion Flow Timestep Shift + NitroFusion Student Sigmas -> SamplerCustom "
                                       "(lcm, CFG 1), guidance in the conditioning (FluxGuidance)",
                       **{k: v for k, v in bare.items() if k.startswith("sample_")}}
    checks = {"detected as FLUX": probe["model_config"] == "Flux",
              "loaded strictly": not probe["missing"] and not probe["unexpected"],
              "velocity": report["velocity_rel_l2"] < TOL,
              "nodes: the file's shift and guidance": (probe["shifted_timestep"], probe["guidance"]) == (SHIFT, 3.5),
              **{f"nodes: {k}": v["rel_l2"] < TOL for k, v in bare.items() if k.startswith("sample_")}}
    for name in loras:
        keys = probe[name]
        want, modules_ours = ours_lora[name]
        rows = compare(want, got, f"{name}_", bare=ours)
        report[name] = {
            "rank": LORA_RANK, "alpha": float(LORA_RANK) * (2 if name == "lora_alpha2r" else 1), "seed": LORA_SEED,
            "applied_with": "nodes.LoraLoaderModelOnly (comfy.sd.load_lora_for_models), strength 1.0",
            "ours": "load_pipeline(FILE, base=FOLDER): diffusers load_lora_weights, adapters unfused",
            "modules_ours": modules_ours,
            "velocity_rel_l2": rows["velocity"]["rel_l2"], "velocity_max_abs_err": rows["velocity"]["max_abs_err"],
            "lora_effect_rel": rows["velocity"]["lora_effect_rel"],
            "rel_err_of_effect": rows["velocity"]["rel_err_of_effect"],
            "samples_through_the_nodes": {k: v for k, v in rows.items() if k.startswith("sample_")},
            **{k: keys[k] for k in ("tensors", "modules", "modules_mapped", "modules_patched", "weights_patched",
                                     "not_loaded", "unmapped")}}
        if name == "lora":
            report[name]["mapping"] = keys["mapping"]
        checks[f"{name}: every key mapped and patched"] = (
            keys["modules_mapped"] == keys["modules_patched"] == keys["modules"] == modules_ours
            and not keys["not_loaded"] and not keys["unmapped"])
        checks.update({f"{name}: {k}": v["rel_l2"] < TOL for k, v in rows.items()})
    checks["bare again after the LoRAs"] = report["velocity_after_loras_rel_l2"] < TOL
    commit = subprocess.run(["git", "-C", a.comfyui, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or a.comfyui_commit
    report = {"comfyui_commit": commit, "shift": SHIFT, "checks": checks, **report}
    text = json.dumps(report, indent=2) + "\n"
    Path(a.report or work / "report.json").write_text(text)
    print(text, end="")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
