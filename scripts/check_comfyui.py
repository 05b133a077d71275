"""Does ComfyUI load what `nitrofusion export` writes? A manual check, not part of CI (CI cannot fetch ComfyUI).

    python scripts/check_comfyui.py --comfyui ComfyUI --node ComfyUI-TimestepShiftModel \
        --python comfy-venv/bin/python --work /tmp/comfy-check

1. builds a random-weight SDXL of the real architecture (fp16 on disk) and exports it with
   `export --format single-file --dtype float16`; writes random rank-4 LoRA factors for every Linear and
   Conv2d with the writer of `export --format lora` (diffusers/PEFT keys and the kohya-style file);
2. computes the references with diffusers and our pipeline: UNet outputs at t = 999 and t = 249, the
   1-step latent of our TimestepShiftLCMScheduler pipeline (docs/method.md §5), a VAE decode, both text
   encoders' last hidden states, and the UNet with each LoRA loaded by `pipe.load_lora_weights`;
3. runs scripts/comfyui_probe.py with ComfyUI's Python, which loads the single file through ComfyUI's
   checkpoint loader, applies the authors' Timestep Shift Model node, samples one step, and loads the LoRAs
   with ComfyUI's LoRA loader;
4. compares, prints a table, writes WORK/report.json, and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HEIGHT = WIDTH = 256  # 32x32 latents: enough to exercise every block, cheap on a CPU


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_models(work: Path, shift: int, rank: int) -> dict[str, Path]:
    from nitrofusion.worlds.pipelines.export import export
    from nitrofusion.worlds.sdxl.testing import build_random_sdxl

    paths = {"base": work / "base", "single": work / "model.safetensors", "lora": work / "lora"}
    if not paths["base"].exists():
        log("building a random full-size SDXL (fp16 on disk)")
        build_random_sdxl(paths["base"], "full", seed=0, dtype=torch.float16)
    if not paths["single"].exists():
        log("export --format single-file --dtype float16")
        export(paths["base"], "single-file", paths["single"], shift=shift, dtype=torch.float16)
    if not paths["lora"].exists():
        # random rank-r factors on every Linear and Conv2d, written by the same function as `export --format lora`:
        # the file format is what is checked here (the SVD extraction is tested on tiny models; on a full SDXL it
        # takes about an hour of CPU)
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel

        from nitrofusion.worlds.pipelines.export import save_lora_files

        log(f"random rank-{rank} LoRA factors, saved as export --format lora saves them")
        config = UNet2DConditionModel.load_config(paths["base"] / "unet")
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(config)
        gen = torch.Generator().manual_seed(1)
        lora = {}
        for name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and getattr(module, "groups", 1) == 1:
                w = module.weight
                a = torch.randn(rank, *w.shape[1:], generator=gen) / w[0].numel() ** 0.5
                b = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=gen) * 0.05
                lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"] = a.half(), b.half()
        paths["lora"].mkdir()
        save_lora_files(paths["lora"], lora, unet.config, rank, shift)
    return paths


def references(paths: dict[str, Path], work: Path, shift: int) -> tuple[dict, dict]:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from nitrofusion.worlds.pipelines.pipeline import load_scheduler, resolve

    gen = torch.Generator().manual_seed(0)
    lat = (1, 4, HEIGHT // 8, WIDTH // 8)
    inp = {"x": torch.randn(lat, generator=gen), "noise": torch.randn(lat, generator=gen),
           "context": torch.randn(1, 77, 2048, generator=gen), "pooled": torch.randn(1, 1280, generator=gen),
           "t999": torch.tensor([999.0]), "t249": torch.tensor([249.0]),
           "vae_latent": torch.randn(1, 4, 16, 16, generator=gen),
           "token_ids": torch.randint(0, 49407, (1, 77), generator=gen).float(),
           "size": torch.tensor([float(HEIGHT), float(WIDTH)])}
    ref: dict[str, torch.Tensor] = {}
    log("references: our pipeline (fp16 weights computed in fp32)")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        paths["base"], torch_dtype=torch.float32, text_encoder=None, text_encoder_2=None, tokenizer=None,
        tokenizer_2=None, scheduler=load_scheduler(resolve(paths["base"]), shift))
    pipe.set_progress_bar_config(disable=True)
    time_ids = torch.tensor([[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]], dtype=torch.float32)
    added = {"text_embeds": inp["pooled"], "time_ids": time_ids}
    with torch.no_grad():
        for name in ("t999", "t249"):
            ref[f"unet_{name}"] = pipe.unet(inp["x"], inp[name], inp["context"], added_cond_kwargs=added).sample
        ref["sample_1step"] = pipe(prompt_embeds=inp["context"], pooled_prompt_embeds=inp["pooled"],
                                   latents=inp["noise"].clone(), num_inference_steps=1, guidance_scale=0.0,
                                   height=HEIGHT, width=WIDTH, output_type="latent").images
        ref["sample_1step"] = ref["sample_1step"] / pipe.vae.config.scaling_factor  # ComfyUI's latent space
        image = pipe.vae.decode(inp["vae_latent"]).sample  # both take the raw (unscaled) VAE latent
        ref["vae_decode"] = ((image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        for name, lora_file in (("peft", paths["lora"] / "pytorch_lora_weights.safetensors"),
                                ("kohya", paths["lora"] / "kohya_lora.safetensors")):
            if not lora_file.exists():
                continue
            pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=name)
            ref[f"lora_{name}_t249"] = pipe.unet(inp["x"], inp["t249"], inp["context"], added_cond_kwargs=added).sample
            pipe.delete_adapters(name)
        del pipe
        for name, cls, folder in (("clip_l", CLIPTextModel, "text_encoder"),
                                  ("clip_g", CLIPTextModelWithProjection, "text_encoder_2")):
            enc = cls.from_pretrained(paths["base"] / folder, torch_dtype=torch.float32)
            ref[f"text_{name}"] = enc(inp["token_ids"].long()).last_hidden_state
            del enc
    return inp, ref


def compare(ref: dict, got: dict) -> list[dict]:
    """fp16 weights computed in fp32 on both sides: only summation order differs (relative L2 < 1e-3). A LoRA
    is judged on its effect: ComfyUI stores patched weights in fp16 (`lora_base_t249` is its unpatched UNet in
    the same setting), so the error is measured against the size of the change the LoRA makes."""
    rows = []
    for key, want in ref.items():
        have = got.get(key)
        if have is None:
            rows.append({"check": key, "ok": False, "note": "ComfyUI produced nothing"})
            continue
        if have.shape != want.shape:
            rows.append({"check": key, "ok": False, "note": f"shape {tuple(have.shape)} vs {tuple(want.shape)}"})
            continue
        err = float((have - want).abs().max())
        if key.startswith("lora_"):
            effect = want - ref["unet_t249"]
            rel = float(((have - got["lora_base_t249"]) - effect).norm() / effect.norm().clamp_min(1e-12))
            size = float(effect.norm() / ref["unet_t249"].norm())
            rows.append({"check": key, "ok": rel < 0.05, "max_abs_err": err, "rel_l2_err": rel,
                         "note": f"error {rel:.2e} of the LoRA's effect (which moves the output by {size:.1%})"})
            continue
        rel = float((have - want).norm() / want.norm().clamp_min(1e-12))
        rows.append({"check": key, "ok": rel < 1e-3, "max_abs_err": err, "rel_l2_err": rel})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description="check that ComfyUI loads nitrofusion's exports")
    ap.add_argument("--comfyui", required=True, type=Path)
    ap.add_argument("--node", required=True, type=Path, help="the authors' ComfyUI-TimestepShiftModel checkout")
    ap.add_argument("--python", required=True, help="a Python that imports ComfyUI (e.g. its venv's)")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--shift", type=int, default=250)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = build_models(args.work, args.shift, args.rank)
    if args.prepare_only:  # a child process, so its fp32 UNet is gone before ComfyUI loads its own
        inp, ref = references(paths, args.work, args.shift)
        save_file({k: v.contiguous() for k, v in inp.items()}, str(args.work / "inputs.safetensors"))
        save_file({k: v.contiguous() for k, v in ref.items()}, str(args.work / "reference.safetensors"))
        return 0
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--prepare-only"], check=True)
    ref = load_file(str(args.work / "reference.safetensors"))
    loras = [f"{n}={f}" for n, f in (("peft", paths["lora"] / "pytorch_lora_weights.safetensors"),
                                      ("kohya", paths["lora"] / "kohya_lora.safetensors")) if f.exists()]
    log("ComfyUI side")
    cmd = [args.python, str(Path(__file__).with_name("comfyui_probe.py")), "--comfyui", str(args.comfyui),
           "--node", str(args.node), "--checkpoint", str(paths["single"]), "--inputs",
           str(args.work / "inputs.safetensors"), "--shift", str(args.shift), "--out",
           str(args.work / "comfy.safetensors"), *[a for item in loras for a in ("--lora", item)]]
    subprocess.run(cmd, check=True)
    got = load_file(str(args.work / "comfy.safetensors"))
    probe = json.loads((args.work / "comfy.json").read_text())
    commit = subprocess.run(["git", "-C", str(args.comfyui), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    rows = compare(ref, got)
    rows.insert(0, {"check": "detected as SDXL (EPS)", "ok": probe["detected"] == "SDXL" and
                    probe["model_type"] == "EPS", "note": f"{probe['detected']} {probe['model_type']}"})
    benign = f" (ComfyUI's own debug-level note: {'; '.join(probe['benign'])})" if probe["benign"] else ""
    rows.insert(1, {"check": "no missing / unexpected / left-over keys", "ok": not probe["load_problems"],
                    "note": ("; ".join(probe["load_problems"])[:500] or "none") + benign})
    for name in ("peft", "kohya"):
        if f"lora_{name}" in probe:
            info = probe[f"lora_{name}"]
            rows.append({"check": f"LoRA ({name}) every key applied", "ok": info["not_loaded"] == 0,
                         "note": f"{info['keys']} tensors, {info['not_loaded']} not applied {info['examples'][:2]}"})
    # the PEFT file is diffusers' format; ComfyUI maps only the older `.processor.to_q` attention names, so it is
    # reported but not required here (docs/guide/export.md: use kohya_lora.safetensors in ComfyUI / A1111)
    for r in rows:
        r["required"] = not (r["check"].startswith("lora_peft") or r["check"].startswith("LoRA (peft)"))
    report = {"comfyui_commit": commit, "shift": args.shift, "probe": probe, "checks": rows}
    (args.work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"ComfyUI {commit}")
    print("| check | ok | detail |\n|---|---|---|")
    for r in rows:
        detail = r.get("note") or f"max abs err {r['max_abs_err']:.2e}, relative L2 {r['rel_l2_err']:.2e}"
        print(f"| {r['check']}{'' if r['required'] else ' (informational)'} | {'yes' if r['ok'] else 'NO'} | "
              f"{detail} |")
    return 0 if all(r["ok"] for r in rows if r["required"]) else 1


if __name__ == "__main__":
    sys.exit(main())
