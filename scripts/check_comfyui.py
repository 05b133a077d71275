"""Does ComfyUI load what `nitrofusion export` writes? A manual check, not part of CI (CI cannot fetch ComfyUI).

    python scripts/check_comfyui.py --comfyui ComfyUI --node ComfyUI-TimestepShiftModel \
        --python comfy-venv/bin/python --work /tmp/comfy-check [--family sdxl sd15 sd2]

Per family (SDXL; SD 1.5; SD 2.1-v, v-prediction):

1. builds a random-weight model of the real architecture (fp16 on disk) and exports it with
   `export --format single-file --dtype float16`; for SDXL also writes random rank-4 LoRA factors for every Linear
   and Conv2d with the writer of `export --format lora` (diffusers/PEFT keys and the kohya-style file);
2. computes the references with diffusers and our pipeline: UNet outputs at t = 999 and t = 249, the
   1-step latent of our TimestepShiftLCMScheduler pipeline (docs/method.md §5), a VAE decode, the text
   encoders' last hidden states, and (SDXL) the UNet with each LoRA loaded by `pipe.load_lora_weights`;
3. runs scripts/comfyui_probe.py with ComfyUI's Python, which loads the single file through ComfyUI's
   checkpoint loader, applies the authors' Timestep Shift Model node, samples one step, and loads the LoRAs
   with ComfyUI's LoRA loader;
4. compares, prints a table, writes WORK/FAMILY/report.json, and exits 1 if any check fails.

ComfyUI tells SD 2.x v-prediction from epsilon by the spread of one LayerNorm bias of the UNet
(output_blocks.11.1.transformer_blocks.0.norm1.bias, std > 0.09: real SD 2.x-v weights have it). Random
initialisation leaves every LayerNorm bias at 0, so the SD 2 check draws the UNet's LayerNorm biases with std 0.2,
as a trained model has them; the check then shows that ComfyUI picks v-prediction for our file.
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


EXPECTED = {"sdxl": ("SDXL", "EPS"), "sd15": ("SD15", "EPS"), "sd2": ("SD20", "V_PREDICTION")}
TEXT = {"sdxl": ("clip_l", "clip_g"), "sd15": ("clip_l",), "sd2": ("clip_h",)}  # ComfyUI's encoder names


def build_sd(work: Path, family: str, shift: int) -> dict[str, Path]:
    """A random full-size SD 1.5 or SD 2.1-v and its single-file export."""
    from nitrofusion.worlds.pipelines.export import export
    from nitrofusion.worlds.sd.testing import build_random_sd

    paths = {"base": work / "base", "single": work / "model.safetensors"}
    if not paths["base"].exists():
        log(f"building a random full-size {family} (fp16 on disk)")
        build_random_sd(paths["base"], "sd1" if family == "sd15" else "sd2", seed=0, size="full",
                        dtype=torch.float16)
        if family == "sd2":  # trained-looking LayerNorm biases for ComfyUI's v-prediction test (see above)
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(paths["base"] / "unet", torch_dtype=torch.float16)
            gen = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for module in unet.modules():
                    if isinstance(module, torch.nn.LayerNorm):
                        module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
            unet.save_pretrained(paths["base"] / "unet")
    if not paths["single"].exists():
        log("export --format single-file --dtype float16")
        export(paths["base"], "single-file", paths["single"], shift=shift, dtype=torch.float16)
    return paths


def build_models(work: Path, shift: int, rank: int, family: str = "sdxl") -> dict[str, Path]:
    from nitrofusion.worlds.pipelines.export import export
    from nitrofusion.worlds.sdxl.testing import build_random_sdxl

    if family != "sdxl":
        return build_sd(work, family, shift)
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


def references(paths: dict[str, Path], work: Path, shift: int, family: str = "sdxl") -> tuple[dict, dict]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from nitrofusion.worlds.pipelines.pipeline import load_scheduler, resolve

    xl = family == "sdxl"
    gen = torch.Generator().manual_seed(0)
    lat = (1, 4, HEIGHT // 8, WIDTH // 8)
    width = {"sdxl": 2048, "sd15": 768, "sd2": 1024}[family]
    inp = {"x": torch.randn(lat, generator=gen), "noise": torch.randn(lat, generator=gen),
           "context": torch.randn(1, 77, width, generator=gen), "pooled": torch.randn(1, 1280, generator=gen),
           "t999": torch.tensor([999.0]), "t249": torch.tensor([249.0]),
           "vae_latent": torch.randn(1, 4, 16, 16, generator=gen),
           "token_ids": torch.randint(0, 49407, (1, 77), generator=gen).float(),
           "size": torch.tensor([float(HEIGHT), float(WIDTH)])}
    ref: dict[str, torch.Tensor] = {}
    log("references: our pipeline (fp16 weights computed in fp32)")
    scheduler = load_scheduler(resolve(paths["base"]), shift)
    if xl:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            paths["base"], torch_dtype=torch.float32, text_encoder=None, text_encoder_2=None, tokenizer=None,
            tokenizer_2=None, scheduler=scheduler)
        time_ids = torch.tensor([[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]], dtype=torch.float32)
        added = {"added_cond_kwargs": {"text_embeds": inp["pooled"], "time_ids": time_ids}}
        extra = {"pooled_prompt_embeds": inp["pooled"], "guidance_scale": 0.0}
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            paths["base"], torch_dtype=torch.float32, text_encoder=None, tokenizer=None, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, scheduler=scheduler)
        added, extra = {}, {"guidance_scale": 1.0}  # SD's pipeline runs CFG above 1
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for name in ("t999", "t249"):
            ref[f"unet_{name}"] = pipe.unet(inp["x"], inp[name], inp["context"], **added).sample
        ref["sample_1step"] = pipe(prompt_embeds=inp["context"], latents=inp["noise"].clone(), num_inference_steps=1,
                                   height=HEIGHT, width=WIDTH, output_type="latent", **extra).images
        ref["sample_1step"] = ref["sample_1step"] / pipe.vae.config.scaling_factor  # ComfyUI's latent space
        image = pipe.vae.decode(inp["vae_latent"]).sample  # both take the raw (unscaled) VAE latent
        ref["vae_decode"] = ((image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        for name, lora_file in (("peft", paths["lora"] / "pytorch_lora_weights.safetensors"),
                                ("kohya", paths["lora"] / "kohya_lora.safetensors")) if "lora" in paths else ():
            if not lora_file.exists():
                continue
            pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=name)
            ref[f"lora_{name}_t249"] = pipe.unet(inp["x"], inp["t249"], inp["context"], **added).sample
            pipe.delete_adapters(name)
        del pipe
        encoders = ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
        for name, (cls, folder) in zip(TEXT[family], encoders, strict=False):
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


def check_family(args, family: str) -> tuple[dict, bool]:
    work = args.work / family
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "reference.safetensors").exists():  # a child process: its fp32 UNet is gone before ComfyUI loads
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--prepare-only", family], check=True)
    paths = build_models(work, args.shift, args.rank, family)
    ref = load_file(str(work / "reference.safetensors"))
    loras = [f"{n}={f}" for n, f in (("peft", paths["lora"] / "pytorch_lora_weights.safetensors"),
                                      ("kohya", paths["lora"] / "kohya_lora.safetensors")) if f.exists()] \
        if "lora" in paths else []
    log(f"ComfyUI side ({family})")
    cmd = [args.python, str(Path(__file__).with_name("comfyui_probe.py")), "--comfyui", str(args.comfyui),
           "--node", str(args.node), "--checkpoint", str(paths["single"]), "--inputs",
           str(work / "inputs.safetensors"), "--shift", str(args.shift), "--family", family, "--out",
           str(work / "comfy.safetensors"), *[a for item in loras for a in ("--lora", item)]]
    subprocess.run(cmd, check=True)
    got = load_file(str(work / "comfy.safetensors"))
    probe = json.loads((work / "comfy.json").read_text())
    rows = compare(ref, got)
    detected, model_type = EXPECTED[family]
    rows.insert(0, {"check": f"detected as {detected} ({model_type})", "ok": probe["detected"] == detected and
                    probe["model_type"] == model_type, "note": f"{probe['detected']} {probe['model_type']}"})
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
    report = {"family": family, "shift": args.shift, "probe": probe, "checks": rows}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{family}")
    print("| check | ok | detail |\n|---|---|---|")
    for r in rows:
        detail = r.get("note") or f"max abs err {r['max_abs_err']:.2e}, relative L2 {r['rel_l2_err']:.2e}"
        print(f"| {r['check']}{'' if r['required'] else ' (informational)'} | {'yes' if r['ok'] else 'NO'} | "
              f"{detail} |")
    return report, all(r["ok"] for r in rows if r["required"])


def main() -> int:
    ap = argparse.ArgumentParser(description="check that ComfyUI loads nitrofusion's exports")
    ap.add_argument("--comfyui", required=True, type=Path)
    ap.add_argument("--node", required=True, type=Path, help="the authors' ComfyUI-TimestepShiftModel checkout")
    ap.add_argument("--python", required=True, help="a Python that imports ComfyUI (e.g. its venv's)")
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--family", nargs="+", default=["sdxl", "sd15", "sd2"], choices=list(EXPECTED))
    ap.add_argument("--shift", type=int, default=250)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--prepare-only", choices=list(EXPECTED), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.shift <= 1000:
        ap.error(f"--shift {args.shift} is outside [1, 1000]: NitroSD-Realism uses 250, -Vibrant 500")
    if args.prepare_only:
        work = args.work / args.prepare_only
        paths = build_models(work, args.shift, args.rank, args.prepare_only)
        inp, ref = references(paths, work, args.shift, args.prepare_only)
        save_file({k: v.contiguous() for k, v in inp.items()}, str(work / "inputs.safetensors"))
        save_file({k: v.contiguous() for k, v in ref.items()}, str(work / "reference.safetensors"))
        return 0
    commit = subprocess.run(["git", "-C", str(args.comfyui), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"ComfyUI {commit}")
    reports, ok = {}, True
    for family in args.family:
        reports[family], passed = check_family(args, family)
        ok &= passed
    (args.work / "report.json").write_text(json.dumps({"comfyui_commit": commit, "families": reports}, indent=2)
                                           + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
