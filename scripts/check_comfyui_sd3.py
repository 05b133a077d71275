"""Does ComfyUI sample our SD3 students as `nitrofusion generate` does? A manual check, not part of CI (CI cannot
fetch ComfyUI); the node's arithmetic itself is tested in CI (tests/test_comfyui_node.py).

    python scripts/check_comfyui_sd3.py --comfyui ComfyUI --python comfy-venv/bin/python --work /tmp/comfy-sd3
    python scripts/check_comfyui_sd3.py ... --variant sd35 --work /tmp/comfy-sd35

`--variant sd35` builds the small SD3 as SD3.5 Medium's MMDiT-X instead: the first block with a second self-attention
on the image tokens (attn2) and RMS-normed q/k in every attention (their weights drawn away from 1, so a loader that
dropped them would show), which ComfyUI must detect from the keys (x_block_self_attn_layers, qk_norm).

1. builds a small random SD3 (2 joint blocks of width 128: ComfyUI reads an MMDiT's depth from its width, 64 per
   block, so the test suite's tiny SD3 is not one it can detect) and exports it with `export --format single-file`;
2. computes with our pipeline (the file loaded as `generate` loads it, fp32): the velocity at t = 249 on fixed
   inputs, and 1- and 4-step samples of our TimestepShiftFlowScheduler from a fixed x_T, re-noised with the draws
   ComfyUI's `lcm` sampler makes for the same seed;
3. runs scripts/comfyui_sd3_probe.py with ComfyUI's Python: ComfyUI's checkpoint loader, our node pack
   (comfyui/ComfyUI-NitroFusion), SamplerCustom's path with the `lcm` sampler and CFG 1;
4. compares (relative L2 error < 1e-5: the same fp32 arithmetic up to summation order), prints a table, writes
   WORK/report.json, exits 1 if a check fails.

The LoRA leg (report key "lora"): random non-zero rank-4 factors (alpha = rank) on every SD3_LORA_TARGETS layer of
that SD3, put on as the trainer puts them (`add_lora`) and saved by `save_lora_files` (what `export --format lora`
writes). Ours: `generate`'s path (`load_pipeline(FILE, base=FOLDER)`: diffusers' `load_lora_weights`). ComfyUI's:
the single file loaded without LoRA, then its `LoraLoaderModelOnly` node at strength 1.0, then our nodes. The same
velocity and samples, the file's modules that ComfyUI maps and patches, and every "lora key not loaded" it logs
(there must be none). Also the same factors saved with alpha = 2 x rank: `save_lora_files` folds alpha / rank into
lora_B (ComfyUI reads an alpha only from `.alpha` tensors, diffusers' format keeps it in the header's LoraConfig), so
ComfyUI must match diffusers on that file too.
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
LORA_RANK = 4
LORA_SEED = 11


def build_medium(work: Path, shift: int) -> tuple[Path, Path]:
    """SD3.5 Medium's full-size architectures with random weights (fp16 on disk; CLIP-L, CLIP-G and the VAE, no T5),
    built as scripts/check_sdcpp.py builds them, exported at `shift`."""
    sys.path.insert(0, str(Path(__file__).parent))
    from check_sdcpp import build_sd3

    from nitrofusion.cli import main as cli

    base = build_sd3(work, "sd35")["base"]
    single = work / f"model-shift{shift}.safetensors"
    if not single.exists():
        assert cli(["export", str(base), "--format", "single-file", "--shift", str(shift), "--dtype", "fp16",
                    "--out", str(single)]) == 0
    return base, single


def build(work: Path, shift: int, variant: str = "sd3") -> tuple[Path, Path]:
    from diffusers import SD3Transformer2DModel

    from nitrofusion.cli import main as cli
    from nitrofusion.worlds.sd3.testing import build_random_sd3, sd3_transformer_config

    base, single = work / "base", work / "model.safetensors"
    if not base.exists():
        build_random_sd3(base)
        torch.manual_seed(1)
        config = {**sd3_transformer_config(2), "attention_head_dim": 64, "num_attention_heads": 2,
                  "caption_projection_dim": 128}
        if variant == "sd35":  # SD3.5 Medium's MMDiT-X features, at this small size
            config.update(qk_norm="rms_norm", dual_attention_layers=(0,))
        transformer = SD3Transformer2DModel(**config)
        if variant == "sd35":
            with torch.no_grad():  # RMS-norm weights start at 1: drawn in [0.5, 1.5) so that each one matters
                for name, p in transformer.named_parameters():
                    if ".norm_q." in name or ".norm_k." in name or ".norm_added_q." in name or ".norm_added_k." in name:
                        p.copy_(torch.rand(p.shape) + 0.5)
        transformer.save_pretrained(base / "transformer")
    if not single.exists():
        assert cli(["export", str(base), "--format", "single-file", "--shift", str(shift), "--out", str(single)]) == 0
    return base, single


def build_lora(base: Path, folder: Path, shift: int, alpha: float) -> Path:
    """Random non-zero factors on every SD3_LORA_TARGETS layer (both streams; the last block has no context-side
    output projection or feed-forward, context_pre_only), the same draws for every alpha, saved as the trainer
    and `export --format lora` save them."""
    from diffusers import SD3Transformer2DModel

    from nitrofusion.worlds.pipelines.testing import random_lora
    from nitrofusion.worlds.sd3.config import SD3_LORA_TARGETS
    from nitrofusion.worlds.sd3.lora import save_lora_files

    path = folder / "pytorch_lora_weights.safetensors"
    if path.exists():
        return path
    net = SD3Transformer2DModel.from_pretrained(base / "transformer")
    factors, metadata = random_lora(net, LORA_RANK, alpha, SD3_LORA_TARGETS, LORA_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    save_lora_files(folder, factors, shift, metadata)
    return path


def inputs(base: Path, latent: tuple[int, ...] = LATENT, whole: bool = False) -> dict:
    """Fixed inputs at the transformer's sizes (its text width and pooled width from its config); `whole`: also a raw
    VAE latent and CLIP token ids for the encoders."""
    config = json.loads((base / "transformer" / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    inp = {"x": torch.randn(latent, generator=gen), "noise": torch.randn(latent, generator=gen),
           "context": torch.randn(1, 77 if not whole else 154, config["joint_attention_dim"], generator=gen),
           "pooled": torch.randn(1, config["pooled_projection_dim"], generator=gen),
           "t249": torch.tensor([249.0]), "seed": torch.tensor([SEED])}
    if whole:
        inp["vae_latent"] = torch.randn(latent, generator=gen)
        inp["token_ids"] = torch.randint(0, 49407, (1, 77), generator=gen).float()
    return inp


def encoders_and_vae(base: Path, inp: dict) -> dict:
    """Our side of the whole-file legs: the base folder's VAE decode of the raw latent (as ComfyUI's VAE node gives
    it: [B, H, W, 3] in [0, 1]) and both CLIP encoders' last hidden states, fp32."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection

    ref = {}
    with torch.no_grad():
        vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32)
        image = vae.decode(inp["vae_latent"]).sample
        ref["vae_decode"] = ((image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        for name, folder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
            enc = CLIPTextModelWithProjection.from_pretrained(base / folder, torch_dtype=torch.float32)
            ref[f"text_{name}"] = enc(inp["token_ids"].long()).last_hidden_state
    return ref


def references(model: Path, base: Path, inp: dict, shift: int | None) -> dict:
    """Our pipeline's velocity and samples: `model` is the single file, or a LoRA file on `base` (its shift read
    from the file, as `generate --model FILE --base FOLDER` reads it)."""
    from nitrofusion.worlds.sd3.pipeline import load_pipeline

    pipe = load_pipeline(model, base=base, shift=shift, dtype=torch.float32)
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
    return ref


def compare(ref: dict, got: dict, prefix: str = "", base_ref: dict | None = None) -> list[dict]:
    """Relative L2 errors of ComfyUI's tensors against ours; with `base_ref` (the model without LoRA) also the
    LoRA's effect on ours and the error relative to that effect."""
    rows = []
    for key, want in ref.items():
        have = got[prefix + key]
        rel = float((have - want).norm() / want.norm())
        row = {"check": prefix + key, "ok": rel < 1e-5, "rel_l2_err": rel,
               "max_abs_err": float((have - want).abs().max())}
        if base_ref is not None:
            effect = want - base_ref[key]
            row["lora_effect_rel"] = float(effect.norm() / base_ref[key].norm())
            row["rel_err_of_effect"] = float((have - want).norm() / effect.norm())
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description="check that ComfyUI samples nitrofusion's SD3 students")
    ap.add_argument("--comfyui", required=True, type=Path)
    ap.add_argument("--python", required=True, help="a Python that imports ComfyUI (e.g. its venv's)")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--shift", type=int, default=250)
    ap.add_argument("--variant", choices=["sd3", "sd35", "sd35-medium"], default="sd3",
                    help="sd35: SD3.5 Medium's MMDiT-X at the small size; sd35-medium: at its full size, with the "
                         "file's CLIP-L, CLIP-G and VAE checked too and no LoRA leg (about 17 GB peak, 4 minutes)")
    ap.add_argument("--report", type=Path, help="also write the report here (default: WORK/report.json only)")
    ap.add_argument("--comfyui-commit", help="ComfyUI's commit, for a source tree that is not a git checkout")
    args = ap.parse_args()
    if not 1 <= args.shift <= 1000:
        ap.error(f"--shift {args.shift} is outside [1, 1000]")
    args.work.mkdir(parents=True, exist_ok=True)
    whole = args.variant == "sd35-medium"
    base, single = build_medium(args.work, args.shift) if whole else build(args.work, args.shift, args.variant)
    loras = {} if whole else {
        "lora": build_lora(base, args.work / "lora", args.shift, float(LORA_RANK)),  # alpha = rank
        "lora_alpha2r": build_lora(base, args.work / "lora_alpha2r", args.shift, 2.0 * LORA_RANK)}
    inp = inputs(base, (1, 16, 32, 32) if whole else LATENT, whole)
    ref = references(single, base, inp, args.shift)
    if whole:
        ref.update(encoders_and_vae(base, inp))
    lora_refs = {name: references(path, base, inp, None) for name, path in loras.items()}
    save_file({k: v.contiguous() for k, v in inp.items()}, str(args.work / "inputs.safetensors"))
    nodes = Path(__file__).resolve().parents[1] / "comfyui" / "ComfyUI-NitroFusion"
    subprocess.run([args.python, str(Path(__file__).with_name("comfyui_sd3_probe.py")), "--comfyui",
                    str(args.comfyui), "--nodes", str(nodes), "--checkpoint", str(single), "--inputs",
                    str(args.work / "inputs.safetensors"), "--shift", str(args.shift), "--out",
                    str(args.work / "comfy.safetensors"),
                    *[a for name, path in loras.items() for a in ("--lora", f"{name}={path}")],
                    *(["--whole"] if whole else [])], check=True)
    got = load_file(str(args.work / "comfy.safetensors"))
    probe = json.loads((args.work / "comfy.json").read_text())
    lora_probe = {name: probe.pop(name) for name in loras}
    want_mmdit = {"depth": 24 if whole else 2, "x_block_self_attn_layers": list(range(13)) if whole else
                  [0] if args.variant == "sd35" else [], "qk_norm": "rms" if args.variant != "sd3" else None}
    rows = [{"check": "detected as SD3 (FLOW)", "ok": probe["detected"] == "SD3" and probe["model_type"] == "FLOW",
             "note": f"{probe['detected']} {probe['model_type']}"},
            {"check": "MMDiT read from the keys", "ok": {**probe["mmdit"], "x_block_self_attn_layers": sorted(
                probe["mmdit"]["x_block_self_attn_layers"] or [])} == want_mmdit,
             "note": json.dumps(probe["mmdit"])}] + compare(ref, got)
    if whole:
        rows.insert(2, {"check": "every key placed (MMDiT, CLIP-L, CLIP-G, VAE)", "ok": not probe["load_problems"]
                        and probe["clip_models"] == ["clip_g", "clip_l"],
                        "note": f"encoders {probe['clip_models']}; problems: {probe['load_problems'] or 'none'}; "
                                f"ComfyUI's own debug-level notes: {probe['benign'] or 'none'}"})

    lora_rows: list[dict] = []
    lora_report = None  # the full-size variant has no LoRA leg (the small ones check the same key mapping)
    if loras:
        keys = lora_probe["lora"]
        lora_rows = [{"check": "every LoRA key applied", "note": (
            f"{keys['modules_patched']} of {keys['modules']} modules ({keys['tensors']} tensors) patched by "
            f"LoraLoaderModelOnly, {len(keys['not_loaded'])} keys not loaded"),
            "ok": keys["modules_mapped"] == keys["modules_patched"] == keys["modules"] and not keys["not_loaded"]}]
        lora_rows += compare(lora_refs["lora"], got, "lora_", ref)
        # alpha = 2 x rank: save_lora_files folds alpha / rank into lora_B (ComfyUI reads an alpha only from
        # `<module>.alpha` tensors), so ComfyUI must give this file's outputs too
        keys2 = lora_probe["lora_alpha2r"]
        lora_rows += [{"check": "alpha = 2 x rank: every LoRA key applied", "ok": keys2["modules_mapped"] ==
                       keys2["modules_patched"] == keys2["modules"] and not keys2["not_loaded"],
                       "note": f"{keys2['modules_patched']} of {keys2['modules']} modules"}]
        lora_rows += compare(lora_refs["lora_alpha2r"], got, "lora_alpha2r_", ref)
        lora_report = {"rank": LORA_RANK, "alpha": float(LORA_RANK), "seed": LORA_SEED, "shift": args.shift,
                       "applied_with": "nodes.LoraLoaderModelOnly (comfy.sd.load_lora_for_models), strength 1.0",
                       "ours": "load_pipeline(FILE, base=FOLDER): diffusers load_lora_weights, adapters unfused",
                       "keys": keys, "keys_alpha_2x_rank": keys2, "checks": lora_rows}
    commit = subprocess.run(["git", "-C", str(args.comfyui), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or args.comfyui_commit
    text = json.dumps({"comfyui_commit": commit, "variant": args.variant, "shift": args.shift, "probe": probe,
                       "checks": rows, "lora": lora_report}, indent=2) + "\n"
    for path in (args.work / "report.json", args.report):
        if path is not None:
            path.write_text(text)
    print(f"ComfyUI {commit}\n| check | ok | detail |\n|---|---|---|")
    for r in rows + lora_rows:
        detail = r.get("note") or f"relative L2 {r['rel_l2_err']:.2e}, max abs {r['max_abs_err']:.2e}"
        if "rel_err_of_effect" in r:
            detail += f"; LoRA effect {r['lora_effect_rel']:.1%}, error {r['rel_err_of_effect']:.2e} of the effect"
        print(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {detail} |")
    return 0 if all(r["ok"] for r in rows + lora_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
