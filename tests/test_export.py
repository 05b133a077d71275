"""Inference and interoperability on a tiny random SDXL run: 1-4 step generation through a stock diffusers
pipeline, diffusers / single-file / LoRA export, weight-delta transfer (docs/method.md §5 and §6), bad input."""

import json
import sys

import numpy as np
import pytest
import torch
from cli_helpers import PROMPTS, generate
from PIL import Image
from safetensors.torch import load_file, save_file

from nitrofusion.cli import main


@pytest.fixture(scope="module")
def run(tiny_sdxl, tmp_path_factory):
    """A 2-step SDXL distillation of the tiny pipeline (lr raised so the student moves visibly from the base)."""
    root = tmp_path_factory.mktemp("export")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["distill", "--preset", "sdxl-tiny", "--teacher", str(tiny_sdxl), "--prompts",
                 str(root / "prompts.txt"), "--out", str(root / "run"), "--set", "student_optim.lr=1e-4"]) == 0
    return root / "run"


def _unet_state(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).state_dict()




def _stock(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generate_from_a_run_in_1_to_4_steps_and_the_same_seed_gives_the_samepngs(run, tmp_path):
    outs = {s: generate(run, tmp_path / f"s{s}", steps=s) for s in (1, 2, 3, 4)}
    for imgs in outs.values():
        assert [im.shape for im in imgs] == [(64, 64, 3)] * 3  # the run's sdxl.resolution
    assert (tmp_path / "s1" / "grid.png").is_file()
    assert not np.array_equal(outs[1][0], outs[2][0]) and not np.array_equal(outs[2][0], outs[4][0])
    again = generate(run, tmp_path / "again", steps=2)
    assert all(np.array_equal(a, b) for a, b in zip(outs[2], again, strict=True))
    assert Image.open(tmp_path / "s2" / "0001.png").text == {"prompt": PROMPTS[1], "seed": "4", "steps": "2"}
    # image i is drawn with seed + i: --seed 4 starts where --seed 3 went on (same prompt, one image per call)
    a = generate(run, tmp_path / "b1", "--num-per-prompt", "2", "--batch-size", "1", "--height", "32",
                  "--width", "48", seed=3)
    assert a[0].shape == (32, 48, 3)
    b = generate(run, tmp_path / "b2", "--num-per-prompt", "2", "--batch-size", "1", "--height", "32",
                  "--width", "48", seed=4)
    assert np.array_equal(a[1], b[0])  # 0001.png of seed 3 is PROMPTS[0] with seed 4, as is 0000.png of seed 4


@pytest.mark.parametrize("steps", [1, 4])
def test_the_pipeline_is_the_training_time_sampler(run, tiny_sdxl, sdxl_adapter, steps):
    """load_pipeline's stock SDXL pipeline == sampling.generate (docs/method.md §5) on the same x_T and noise."""
    from nitrofusion import load_pipeline
    from nitrofusion.sampling.student import generate

    pipe = load_pipeline(run)
    assert type(pipe.scheduler).__name__ == "TimestepShiftLCMScheduler"
    assert pipe.scheduler.config.shifted_timestep == 250 and pipe.scheduler.config.original_inference_steps == 4
    with torch.no_grad():
        ref = pipe("a red cat", num_inference_steps=steps, guidance_scale=0.0, output_type="latent", height=64,
                   width=64, generator=[torch.Generator().manual_seed(5)]).images
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(1, 4, 32, 32, generator=g)
    ours = generate(sdxl_adapter, pipe.unet, x_T, sdxl_adapter.encode_prompts(["a red cat"]), steps, 250,
                    generator=g)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_exported_folder_in_a_stock_pipeline_reproduces_generate_bit_for_bit(run, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from nitrofusion.worlds.pipelines.pipeline import image_generators

    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 0
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["scheduler"] == ["nitrofusion", "TimestepShiftLCMScheduler"]
    student = _unet_state(run / "student" / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "exp" / "unet")  # stock loader
    assert all(torch.equal(v, student[k]) for k, v in unet.state_dict().items()) and len(student) == len(
        unet.state_dict())

    ours = generate(run, tmp_path / "gen", steps=2, seed=3)
    pipe = _stock(tmp_path / "exp")  # stock StableDiffusionXLPipeline, nitrofusion imported
    assert type(pipe.scheduler).__name__ == "TimestepShiftLCMScheduler"
    with torch.no_grad():
        stock = pipe(PROMPTS, num_inference_steps=2, guidance_scale=0.0, generator=image_generators(3, 0, 3)).images
    assert all(np.array_equal(np.asarray(s), o) for s, o in zip(stock, ours, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(generate(tmp_path / "exp", tmp_path / "gen2"), ours, strict=True))

    # without nitrofusion imported, diffusers refuses loudly instead of substituting another scheduler
    monkeypatch.delitem(sys.modules, "nitrofusion")
    with pytest.raises(ValueError, match="nitrofusion"):
        _stock(tmp_path / "exp")


def test_single_file_round_trip_through_diffusers_converters_is_exact(run, tiny_sdxl, tmp_path):
    from nitrofusion import load_pipeline
    from nitrofusion.worlds.pipelines.export import original_to_diffusers

    path = tmp_path / "nitro.safetensors"
    assert main(["export", str(run), "--format", "single-file", "--out", str(path)]) == 0
    sd = load_file(str(path))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                "conditioner.embedders.1.model.")
    assert all(k.startswith(prefixes) for k in sd) and all(any(k.startswith(p) for k in sd) for p in prefixes)
    unet_keys = ("input_blocks.0.0.weight", "input_blocks.3.0.op.weight", "middle_block.1.proj_in.weight",
                 "output_blocks.2.2.conv.weight", "output_blocks.8.0.skip_connection.weight", "label_emb.0.0.weight")
    for key in (*("model.diffusion_model." + k for k in unet_keys),
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "first_stage_model.decoder.up.0.block.2.conv1.weight"):
        assert key in sd, key
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convs in the original VAE

    pipe = load_pipeline(run)
    back = original_to_diffusers(sd, pipe)  # diffusers' own converters, on what was written
    for name, converted in back.items():
        own = {k: v for k, v in getattr(pipe, name).state_dict().items() if not k.endswith("position_ids")}
        assert converted.keys() == own.keys() and all(torch.equal(converted[k], own[k]) for k in own), name
    # the single file's UNet (shift from its metadata) generates what the run generates
    ours = generate(run, tmp_path / "run")
    assert all(np.array_equal(a, b) for a, b in zip(
        generate(path, tmp_path / "single", "--base", str(tiny_sdxl)), ours, strict=True))


def _sdxl_with_distinct_encoders(folder):
    """The tiny SDXL with a wider second text encoder. from_single_file tells SDXL's two encoders apart by width
    (768 vs 1280 in SDXL); the tiny fixture's are both 32 wide, so it would load one into the other."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from nitrofusion.worlds.sdxl.testing import build_random_sdxl, build_sdxl_unet, sdxl_unet_config

    build_random_sdxl(folder, "tiny", seed=1)
    cfg = CLIPTextConfig.from_pretrained(folder / "text_encoder_2").to_dict()
    cfg.update(hidden_size=48, projection_dim=48)
    torch.manual_seed(2)
    CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).save_pretrained(folder / "text_encoder_2")
    unet_cfg = sdxl_unet_config("tiny")
    unet_cfg.update(cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=48 + 6 * 8)
    build_sdxl_unet("tiny").__class__(**unet_cfg).save_pretrained(folder / "unet")
    return folder


def test_from_single_file_loads_every_component_of_a_single_file_export_bitwise(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = _sdxl_with_distinct_encoders(tmp_path / "sdxl")
    path = tmp_path / "model.safetensors"
    assert main(["export", str(folder), "--format", "single-file", "--shift", "500", "--out", str(path)]) == 0
    single = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    own = _stock(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(own, name).state_dict(), getattr(single, name).state_dict()
        a, b = ({k: v for k, v in d.items() if not k.endswith("position_ids")} for d in (a, b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_lora_error_falls_as_rank_grows_and_it_moves_the_base_toward_the_student(run, tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel

    from nitrofusion.worlds.pipelines.export import KOHYA_LORA_FILE, lora_from_delta
    from nitrofusion.worlds.pipelines.pipeline import guess_shift, load_unet, resolve

    student = UNet2DConditionModel.from_pretrained(run / "student" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    reports = [lora_from_delta(student, base, r)[1] for r in (1, 2, 4, 8, 16, 32, 64, 128)]
    for key in ("relative_error_covered", "relative_error_total"):
        errors = [r[key] for r in reports]
        assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), (key, errors)
    assert reports[-1]["relative_error_covered"] < 1e-6  # 128 >= every layer's smaller side: exact
    assert 0 < reports[0]["uncovered_fraction"] < 0.5
    assert reports[-1]["relative_error_total"] == pytest.approx(reports[0]["uncovered_fraction"] ** 0.5, rel=1e-3)

    x, t = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([249])
    cond = {"encoder_hidden_states": torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1)),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64,
                                                                                                 64]])}}
    with torch.no_grad():
        out_s, out_b = student(x, t, **cond).sample, base(x, t, **cond).sample
    gaps = {}
    for rank in (4, 64):
        out = tmp_path / f"lora{rank}"
        assert main(["export", str(run), "--format", "lora", "--rank", str(rank), "--out", str(out)]) == 0
        report = json.loads((out / "lora_report.json").read_text())
        pipe = _stock(tiny_sdxl)
        pipe.load_lora_weights(str(out))  # diffusers' own SDXL LoRA loader
        with torch.no_grad():
            out_l = pipe.unet(x, t, **cond).sample  # the LoRA as loaded (unfused)
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights
        fused = pipe.unet.state_dict()
        assert guess_shift(resolve(out / KOHYA_LORA_FILE)) == 250  # the run's shift rides along in the metadata
        for name in ("pytorch_lora_weights.safetensors", KOHYA_LORA_FILE):  # a LoRA file as --model, with --base
            got = load_unet(resolve(out / name, tiny_sdxl)).state_dict()
            assert got.keys() == fused.keys() and all(torch.allclose(got[k], fused[k], atol=1e-6) for k in got)
        s, b = student.state_dict(), base.state_dict()
        factors = load_file(str(out / "pytorch_lora_weights.safetensors"))
        covered = [k.removeprefix("unet.").removesuffix(".lora_A.weight") + ".weight" for k in factors
                   if k.endswith(".lora_A.weight")]
        err = sum((fused[k].double() - s[k].double()).square().sum() for k in covered)
        norm = sum((s[k].double() - b[k].double()).square().sum() for k in covered)
        assert float(err / norm) ** 0.5 == pytest.approx(report["relative_error_covered"], rel=1e-3, abs=1e-5)
        gaps[rank] = float((out_l - out_s).norm())
        _check_kohya_file(out, rank, base, factors, out_l, x, t, cond, tiny_sdxl)
    assert gaps[64] < gaps[4] < float((out_b - out_s).norm())


def _check_kohya_file(out, rank, base, factors, out_peft, x, t, cond, tiny_sdxl):
    """The kohya-style file holds the PEFT file's factors under the original SDXL module names (those A1111 and
    ComfyUI map LoRA keys to), and diffusers' kohya converter loads it to the same UNet."""
    from nitrofusion.worlds.pipelines.export import KOHYA_LORA_FILE, unet_to_original

    kohya = load_file(str(out / KOHYA_LORA_FILE))
    original = unet_to_original(base.state_dict(), base.config)
    modules = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): v.shape for k, v in original.items()
               if k.endswith(".weight") and v.ndim >= 2}
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert stems <= modules.keys() and len(stems) == sum(k.endswith(".lora_A.weight") for k in factors)
    for stem in stems:
        down, up = kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"]
        assert float(kohya[f"{stem}.alpha"]) == rank and down.shape[0] == rank
        assert (up.flatten(1) @ down.flatten(1)).numel() == modules[stem].numel()
    assert sorted(v.sum().item() for k, v in kohya.items() if k.endswith("lora_down.weight")) == sorted(
        v.sum().item() for k, v in factors.items() if k.endswith("lora_A.weight"))
    pipe = _stock(tiny_sdxl)
    pipe.load_lora_weights(str(out), weight_name=KOHYA_LORA_FILE)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, **cond).sample, out_peft, rtol=1e-5, atol=1e-5)


def test_transfer_is_exact_arithmetic(run, tiny_sdxl, tmp_path):
    from nitrofusion.worlds.pipelines.export import unet_to_original
    from nitrofusion.worlds.sdxl.testing import build_sdxl_unet

    custom = build_sdxl_unet("tiny", seed=7)  # a "fine-tuned SDXL": same layout, other weights
    custom.save_pretrained(tmp_path / "custom")
    assert main(["transfer", "--student", str(run), "--base", str(tiny_sdxl), "--custom", str(tmp_path / "custom"),
                 "--out", str(tmp_path / "out")]) == 0
    s, b, c = _unet_state(run / "student" / "unet"), _unet_state(tiny_sdxl / "unet"), custom.state_dict()
    got = _unet_state(tmp_path / "out" / "unet")
    assert got.keys() == s.keys() and all(torch.equal(got[k], c[k] + (s[k] - b[k])) for k in s)
    sched = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "TimestepShiftLCMScheduler" and sched["shifted_timestep"] == 250

    # the same from weights files: the student as a released-format file, the custom model as an A1111 checkpoint
    save_file(s, str(tmp_path / "student.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in unet_to_original(c, custom.config).items()},
              str(tmp_path / "custom_a1111.safetensors"))
    assert main(["transfer", "--student", str(tmp_path / "student.safetensors"), "--base", str(tiny_sdxl), "--custom",
                 str(tmp_path / "custom_a1111.safetensors"), "--out", str(tmp_path / "out.safetensors")]) == 0
    again = load_file(str(tmp_path / "out.safetensors"))
    assert again.keys() == got.keys() and all(torch.equal(again[k], got[k]) for k in got)


def test_a_released_format_unet_file_loads_through_base(run, tiny_sdxl, tmp_path):
    from nitrofusion import load_pipeline

    state = _unet_state(run / "student" / "unet")
    save_file(state, str(tmp_path / "nitrosd-realism_unet.safetensors"))  # how NitroSD ships: diffusers keys
    ours = generate(run, tmp_path / "run")
    released = generate(tmp_path / "nitrosd-realism_unet.safetensors", tmp_path / "rel", "--base", str(tiny_sdxl))
    assert all(np.array_equal(a, b) for a, b in zip(released, ours, strict=True))
    save_file({"unet." + k: v.half() for k, v in state.items()}, str(tmp_path / "nitrosd-vibrant_unet.safetensors"))
    pipe = load_pipeline(tmp_path / "nitrosd-vibrant_unet.safetensors", base=tiny_sdxl)
    assert pipe.scheduler.config.shifted_timestep == 500 and pipe.unet.dtype == torch.float32
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], state["conv_in.weight"].half().float())


def _bad(tmp_path, tiny_sdxl, run):
    state = _unet_state(run / "student" / "unet")
    save_file(state, str(tmp_path / "unnamed.safetensors"))
    save_file({k: v for k, v in state.items() if k != "conv_in.weight"}, str(tmp_path / "missing_key.safetensors"))
    save_file({**state, "conv_out.bias": torch.zeros(5)}, str(tmp_path / "bad_shape.safetensors"))
    other = {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == "conv_in.weight" else v)
             for k, v in state.items()}
    save_file(other, str(tmp_path / "other_shape.safetensors"))
    from diffusers import UNet2DConditionModel

    from nitrofusion.worlds.pipelines.export import lora_from_delta

    sd1 = [UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768)
           for _ in range(2)]  # Stable Diffusion 1.x's text width: another family than the SDXL base
    save_file(sd1[0].state_dict(), str(tmp_path / "sd15_model.safetensors"))
    lora, _ = lora_from_delta(sd1[1], sd1[0], 2)
    save_file({"unet." + k: v for k, v in lora.items()}, str(tmp_path / "sd15_lora.safetensors"))
    return {"RUN": str(run), "SDXL": str(tiny_sdxl), "T": str(tmp_path)}


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--model", "RUN", "--prompt", "a", "--steps", "5", "--out", "T/o"], "steps must be 1, 2, 3 or 4"),
    (["generate", "--model", "RUN", "--prompt", "a", "--steps", "0", "--out", "T/o"], "steps must be 1, 2, 3 or 4"),
    (["generate", "--model", "T/none.safetensors", "--prompt", "a", "--out", "T/o"], "UNet weights file not found"),
    (["generate", "--model", "T/unnamed.safetensors", "--prompt", "a", "--out", "T/o"], "needs --base PIPELINE_FOLDER"),
    (["generate", "--model", "T/unnamed.safetensors", "--base", "SDXL", "--prompt", "a", "--out", "T/o"],
     "cannot tell the timestep shift of unnamed.safetensors"),
    (["generate", "--model", "T/missing_key.safetensors", "--base", "SDXL", "--shift", "250", "--prompt", "a",
      "--out", "T/o"], "1 missing, 0 unexpected, 0 wrong-shape keys (e.g. 'conv_in.weight')"),
    (["generate", "--model", "T/sd15_model.safetensors", "--base", "SDXL", "--shift", "250", "--prompt", "a",
      "--out", "T/o"], "sd15_model.safetensors is Stable Diffusion 1.x (cross-attention width 768), but the base "
                       "<SDXL> is an SDXL-layout UNet (cross-attention width 64)"),
    (["generate", "--model", "T/sd15_lora.safetensors", "--base", "SDXL", "--shift", "250", "--prompt", "a",
      "--out", "T/o"], "LoRA T/sd15_lora.safetensors is Stable Diffusion 1.x (cross-attention width 768), but the "
                       "base <SDXL> is an SDXL-layout"),
    (["generate", "--model", "RUN", "--base", "T/nope", "--prompt", "a", "--out", "T/o"],
     "base pipeline folder not found"),
    (["generate", "--model", "RUN", "--prompt", "a", "--height", "60", "--out", "T/o"],
     "--height must be a positive multiple of 8"),
    (["export", "RUN", "--format", "onnx", "--out", "T/o"], "unknown export format 'onnx'"),
    (["export", "RUN", "--format", "lora", "--rank", "0", "--out", "T/o"], "--rank must be >= 1"),
    (["export", "RUN", "--format", "single-file", "--out", "T/o.ckpt"], "writes a .safetensors file"),
    (["export", "RUN", "--format", "diffusers", "--out", "T"], "already exists"),
    (["export", "RUN", "--format", "diffusers", "--dtype", "fp8", "--out", "T/o"], "unknown --dtype 'fp8'"),
    (["export", "T/nothing", "--format", "diffusers", "--out", "T/o"], "no model in"),
    (["transfer", "--student", "RUN", "--base", "SDXL", "--custom", "T/bad_shape.safetensors", "--out", "T/o"],
     "wrong-shape keys (e.g. 'conv_out.bias' ((5,) vs (4,)))"),
    (["transfer", "--student", "RUN", "--base", "T/missing_key.safetensors", "--custom", "SDXL", "--out", "T/o"],
     "--base T/missing_key.safetensors does not match --student"),
    (["transfer", "--student", "RUN", "--base", "SDXL", "--custom", "T/other_shape.safetensors", "--out", "T/o"],
     "'conv_in.weight'"),
    (["transfer", "--student", "RUN", "--base", "T/gone", "--custom", "SDXL", "--out", "T/o"], "--base not found"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, tiny_sdxl, tmp_path, capsys, argv, needle):
    subs = _bad(tmp_path, tiny_sdxl, run)
    argv = [subs.get(a, a) for a in argv]
    argv = [a.replace("T/", subs["T"] + "/") for a in argv]
    needle = needle.replace("T/", subs["T"] + "/").replace("<SDXL>", subs["SDXL"])
    before = set(tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert set(tmp_path.iterdir()) == before  # no output, no temporary sibling left behind


@pytest.mark.slow
def test_sdxl_generate_prints_only_its_result(run, tmp_path):
    """A fresh process (warnings are printed once per process), offline (bitsandbytes' hub kernel load then warns
    through `kernels`): no library chatter before the result line."""
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "nitrofusion", "generate", "--model", str(run), "--prompt", PROMPTS[0],
            "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    noise = [ln for ln in done.stderr.splitlines() if "torchvision" in ln or "kernels" in ln]
    assert not noise and done.stdout.strip().splitlines() == [f"wrote 1 image and a grid to {tmp_path / 'out'}"]


@pytest.mark.parametrize("fmt", ["diffusers", "single-file", "lora"])
def test_a_full_disk_during_an_export_is_one_line_and_leaves_nothing(run, tmp_path, capsys, monkeypatch, fmt):
    """The disk fills once every file is written, before the rename into place (faults.py): one line with the
    space the export needs, no --out and no temporary left beside it; with space again the export works."""
    from nitrofusion import faults

    faults.reset()
    monkeypatch.setenv("NITROFUSION_DISK_FULL_AT", "export-write")
    out = tmp_path / ("student.safetensors" if fmt == "single-file" else fmt)
    argv = ["export", str(run), "--format", fmt, "--out", str(out)] + (["--rank", "4"] if fmt == "lora" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write the export to {out} (No space left on device; it needs about" in err[0]
    assert "free there); free space or fix permissions, then run the export again" in err[0], err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("NITROFUSION_DISK_FULL_AT")
    assert main(argv) == 0 and out.exists()


def test_an_sd2_single_file_carries_vit_h_s_24th_block_as_an_exact_identity():
    """Released SD 2.x files hold all 24 blocks of OpenCLIP ViT-H's text tower (ComfyUI and stable-diffusion.cpp
    build 24); diffusers keeps 23. The export adds the 24th with zero weights: diffusers' converter skips it, and a
    24-block encoder loaded from the file computes the 23-block encoder's last hidden state bit for bit."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from nitrofusion.worlds.pipelines.export import (
        OPEN_CLIP_H_BLOCKS,
        SD2_CLIP_PREFIX,
        open_clip_from_hf,
        with_identity_last_block,
    )

    def encoder(layers: int) -> CLIPTextModel:
        return CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                            num_hidden_layers=layers, vocab_size=64, max_position_embeddings=77,
                                            hidden_act="gelu")).eval()

    torch.manual_seed(0)
    short = encoder(OPEN_CLIP_H_BLOCKS - 1)
    tower = with_identity_last_block(open_clip_from_hf(short.state_dict()))
    last = f"transformer.resblocks.{OPEN_CLIP_H_BLOCKS - 1}."
    added = {k: v for k, v in tower.items() if k.startswith(last)}
    assert len(added) == 12 and all(not v.any() for v in added.values())
    # diffusers' own converter, under the SD 2 prefix, gives back exactly the 23 blocks
    back = convert_open_clip_checkpoint(short, {SD2_CLIP_PREFIX + k: v for k, v in tower.items()})
    own = short.state_dict()
    back = {k if k in own else k.removeprefix("text_model."): v for k, v in back.items()}
    assert all(torch.equal(back[k], v) for k, v in own.items() if not k.endswith("position_ids"))
    # a 24-block encoder with the file's weights (another prefix keeps the 24th block) is the same function
    full = encoder(OPEN_CLIP_H_BLOCKS)
    weights = convert_open_clip_checkpoint(full, {"tower." + k: v for k, v in tower.items()}, prefix="tower.")
    missing, unexpected = full.load_state_dict(
        {k if k in full.state_dict() else k.removeprefix("text_model."): v for k, v in weights.items()}, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    ids = torch.randint(0, 64, (2, 77))
    with torch.no_grad():
        assert torch.equal(full(ids).last_hidden_state, short(ids).last_hidden_state)
    assert with_identity_last_block(open_clip_from_hf(encoder(2).state_dict())).keys() == \
        open_clip_from_hf(encoder(2).state_dict()).keys()  # only ViT-H's 23-block tower is completed
