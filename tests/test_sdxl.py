"""The SDXL path on tiny random-weight pipelines: adapter, teacher samplers vs diffusers, weight files,
LoRA fusing, and a distillation run through the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nitrofusion.cli import main
from nitrofusion.errors import NitroFusionError
from nitrofusion.method.backbone import UNetBackbone, level_channels
from nitrofusion.sampling.teacher import SamplerSpec
from nitrofusion.worlds.sdxl.adapter import SDXLAdapter, SDXLConfig
from nitrofusion.worlds.sdxl.testing import build_sdxl_unet


def _pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_backbone_returns_ten_maps_for_the_sdxl_layout_and_the_right_count_otherwise():
    from diffusers import UNet2DConditionModel

    unet = build_sdxl_unet("tiny")
    feats = UNetBackbone(unet)(torch.randn(2, 4, 32, 32), torch.tensor([10, 500]), torch.randn(2, 77, 64),
                               {"text_embeds": torch.randn(2, 32), "time_ids": torch.ones(2, 6)})
    assert len(feats) == 10 == len(level_channels(unet))
    assert [f.shape[1] for f in feats] == level_channels(unet) == [32, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert [f.shape[-1] for f in feats] == [32, 32, 32, 16, 16, 16, 8, 8, 8, 8]
    two = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                               sample_size=16, attention_head_dim=4)
    feats = UNetBackbone(two)(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 7, 16))
    assert len(feats) == 7 == len(level_channels(two))  # conv_in, 2 + down, 2, mid


def test_prompt_encoding_matches_the_stock_pipeline(sdxl_adapter, tiny_sdxl):
    prompts = ["a red cat", "a dog on a beach"]
    cond = sdxl_adapter.encode_prompts(prompts)
    with torch.no_grad():
        embeds, _, pooled, _ = _pipe(tiny_sdxl).encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["text_embeds"], pooled)
    null = sdxl_adapter.null_cond(cond)
    assert all(not v.any() for v in null.values())


@pytest.mark.parametrize("spec,scheduler,kwargs", [
    (SamplerSpec("ddim", 4, 0.0, "trailing"), "DDIMScheduler", {"num_inference_steps": 4}),
    (SamplerSpec("euler", 5, 0.0, "trailing"), "EulerDiscreteScheduler", {"num_inference_steps": 5}),
    (SamplerSpec("dpmsolver++", 6, 0.0, "trailing"), "DPMSolverMultistepScheduler", {"num_inference_steps": 6}),
    (SamplerSpec("LCMScheduler", 4, 0.0, timesteps=[999, 749, 499, 249]), "LCMScheduler",
     {"timesteps": [999, 749, 499, 249]}),
    (SamplerSpec("x0-renoise", 4, 0.0, timesteps=[999, 749, 499, 249]), "LCMScheduler",
     {"timesteps": [999, 749, 499, 249]}),
])
def test_teacher_samplers_match_diffusers_on_the_same_noise(sdxl_adapter, tiny_sdxl, spec, scheduler, kwargs):
    import diffusers

    from nitrofusion.sampling.teacher import _scheduler

    pipe = _pipe(tiny_sdxl)
    # the pipeline gets the very scheduler our spec builds (DDIM without alpha-to-one, DPM++ 2M to sigma 0)
    pipe.scheduler = (_scheduler(spec, dict(pipe.scheduler.config)) if spec.name != "x0-renoise"
                      else getattr(diffusers, scheduler).from_config(pipe.scheduler.config))
    assert type(pipe.scheduler).__name__ == scheduler
    prompts = ["a red cat", "a dog"]
    x_T = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = sdxl_adapter.teacher_sample(x_T, sdxl_adapter.encode_prompts(prompts), spec,
                                       generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(prompts, latents=x_T.clone(), guidance_scale=0.0, output_type="latent", height=64, width=64,
                   generator=torch.Generator().manual_seed(3), **kwargs).images
    # x0-renoise is DMD2's sampler written out; LCM's boundary condition c_skip(t>=249) ~ 4e-8 is the only gap
    tol = 1e-4 if spec.name == "x0-renoise" else 0.0
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


def test_crops_get_matching_micro_conditioning(sdxl_adapter):
    full = sdxl_adapter.time_ids(torch.zeros(2, 4, 32, 32), None)
    assert full.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    crop = sdxl_adapter.time_ids(torch.zeros(2, 4, 16, 16), torch.tensor([[0, 4], [16, 8]]))
    assert crop.tolist() == [[64, 64, 0, 8, 32, 32], [64, 64, 32, 16, 32, 32]]  # full size, corner, crop size


def test_a_unet_weights_file_replaces_the_teacher_unet(tiny_sdxl, tmp_path):
    other = build_sdxl_unet("tiny", seed=7).state_dict()
    save_file(other, str(tmp_path / "unet.safetensors"))
    torch.save({k: v.half() for k, v in other.items()}, tmp_path / "unet_fp16.bin")  # DMD2 ships .bin
    for name in ("unet.safetensors", "unet_fp16.bin"):
        a = SDXLAdapter(tiny_sdxl, SDXLConfig(resolution=64, teacher_unet=str(tmp_path / name)))
        sd = a.teacher_unet.state_dict()
        tol = 1e-3 if name.endswith(".bin") else 0.0
        assert all(torch.allclose(sd[k], other[k], atol=tol, rtol=tol) for k in other)
    del other["conv_in.weight"]
    save_file(other, str(tmp_path / "bad.safetensors"))
    with pytest.raises(NitroFusionError,
                       match="does not match the teacher's UNet: 1 missing.*conv_in.weight.*diffusers-format"):
        SDXLAdapter(tiny_sdxl, SDXLConfig(resolution=64, teacher_unet=str(tmp_path / "bad.safetensors")))


def test_a_lora_is_fused_into_the_teacher(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = build_sdxl_unet("tiny", seed=1)  # the folder's UNet (build_random_sdxl uses seed + 1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    a = SDXLAdapter(tiny_sdxl, SDXLConfig(resolution=64, teacher_lora=str(tmp_path / "lora")))
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
    cond = a.encode_prompts(["a red cat"])
    with torch.no_grad():
        torch.testing.assert_close(a.unet_call(a.teacher_unet, x, t, cond), a.unet_call(unet, x, t, cond),
                                   rtol=1e-4, atol=1e-4)
    bogus = {"unet.nonexistent.lora_A.weight": torch.zeros(4, 8), "unet.nonexistent.lora_B.weight": torch.zeros(8, 4)}
    save_file(bogus, str(tmp_path / "bogus.safetensors"))
    with pytest.raises(NitroFusionError, match="LoRA .*bogus.safetensors"):
        SDXLAdapter(tiny_sdxl, SDXLConfig(resolution=64, teacher_lora=str(tmp_path / "bogus.safetensors")))


def test_a_folder_that_is_not_sdxl_is_refused_in_one_line(tiny_sdxl, tmp_path):
    with pytest.raises(NitroFusionError, match="not a diffusers pipeline"):
        SDXLAdapter(tmp_path)
    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    index.pop("text_encoder_2")
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(NitroFusionError, match="not a complete SDXL pipeline: it lacks .*text_encoder_2"):
        SDXLAdapter(tmp_path)


def _distill(folder, prompts, out, *sets):
    argv = ["distill", "--preset", "sdxl-tiny", "--teacher", str(folder), "--prompts", str(prompts),
            "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    return main(argv)


def test_cli_distils_a_tiny_sdxl_pipeline_for_two_optimiser_steps(tiny_sdxl, prompt_file, tmp_path):
    from diffusers import UNet2DConditionModel

    assert _distill(tiny_sdxl, prompt_file, tmp_path / "run") == 0
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and not any(e["skipped"] for e in log)
    student = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "student" / "unet")
    teacher = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, student.state_dict()[k])]
    assert len(changed) > 100  # a full fine-tune moved the student
    sched = json.loads((tmp_path / "run" / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "TimestepShiftLCMScheduler" and sched["shifted_timestep"] == 250


@pytest.mark.parametrize("sets", [["mixed_precision=bf16", "gradient_checkpointing=true"],
                                  ["pairs.online=true"], ["pairs.in_memory=true", "pairs.dtype=float16"],
                                  ["student_optim.kind=adamw8bit", "heads_optim.kind=adamw8bit"]])
def test_sdxl_distillation_variants_run(tiny_sdxl, prompt_file, tmp_path, sets):
    if any("adamw8bit" in s for s in sets):
        pytest.importorskip("bitsandbytes")
    assert _distill(tiny_sdxl, prompt_file, tmp_path / "run", *sets) == 0
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(e["loss_g"] == e["loss_g"] for e in log)


def test_streamed_pairs_equal_pairs_in_memory(sdxl_adapter, tmp_path):
    from nitrofusion.data.pairs import generate_pairs, load_pairs

    generate_pairs(sdxl_adapter, ["a cat", "a dog"], 6, 0, tmp_path, shard_size=4, batch_size=4, progress=False)
    mem, lazy = load_pairs(tmp_path), load_pairs(tmp_path, in_memory=False)
    idx = torch.tensor([5, 0, 3, 4])
    for a, b in zip(mem.batch(idx), lazy.batch(idx), strict=True):
        assert a == b if isinstance(a, list) else torch.equal(a, b)


def test_pair_generation_sharded_over_processes_equals_one_process(sdxl_adapter, tmp_path):
    from nitrofusion.data.pairs import generate_pairs, load_pairs, write_index_file
    from nitrofusion.data.prompts import open_prompts

    source = tmp_path / "p.txt"
    source.write_text("".join(f"prompt number {i}\n" for i in range(7)))
    prompts = open_prompts(str(source))
    generate_pairs(sdxl_adapter, prompts, 10, 0, tmp_path / "one", shard_size=4, batch_size=4, progress=False)
    for rank in (1, 0):  # two "processes", each its own shards; the index is written once both are done
        generate_pairs(sdxl_adapter, prompts, 10, 0, tmp_path / "two", shard_size=4, batch_size=4,
                       process_index=rank, num_processes=2, progress=False, write_index=False)
    write_index_file(tmp_path / "two", 10, 0, 4, sdxl_adapter)
    one, two = load_pairs(tmp_path / "one"), load_pairs(tmp_path / "two")
    assert torch.equal(one.x0, two.x0) and one.prompts == two.prompts
    assert one.prompts[:8] == [f"prompt number {i}" for i in range(7)] + ["prompt number 0"]  # in order, cycled


@pytest.mark.parametrize("argv,needle", [
    (["--prompts", "EMPTY"], "has no usable prompts"),
    (["--prompts", "/nonexistent.txt"], "prompt source not found: /nonexistent.txt"),
    ([], "world 'sdxl' needs prompts: --prompts FILE"),
    (["--prompts", "GOOD", "--teacher", "/nonexistent"], "not a diffusers pipeline"),
    (["--prompts", "GOOD", "--set", "sdxl.sampler.name=Bogus"], "unknown sampler 'Bogus'"),
    (["--prompts", "GOOD", "--set", "sdxl.teacher_lora=/no/lora.safetensors"], "teacher LoRA not found"),
    (["--prompts", "GOOD", "--set", "sdxl.teacher_unet=/no/unet.safetensors"], "UNet weights file not found"),
    (["--prompts", "GOOD", "--set", "sdxl.resolution=60"], "sdxl.resolution must be a positive multiple of 8"),
])
def test_sdxl_bad_input_is_one_line_and_exit_2(tiny_sdxl, prompt_file, tmp_path, capsys, argv, needle):
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv = [{"EMPTY": str(tmp_path / "empty.txt"), "GOOD": str(prompt_file)}.get(a, a) for a in argv]
    if "--teacher" not in argv:
        argv += ["--teacher", str(tiny_sdxl)]
    assert main(["distill", "--preset", "sdxl-tiny", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_unused_downloaded_weights_are_never_unpickled(tmp_path):
    from nitrofusion.models.weights import read_weights

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(NitroFusionError, match="cannot read UNet weights"):
        read_weights(tmp_path / "evil.bin")
    assert load_file  # safetensors is the preferred format


def test_a_truncated_unet_download_is_one_line(tiny_sdxl, tmp_path):
    import shutil

    from nitrofusion.errors import NitroFusionError
    from nitrofusion.worlds.sdxl.adapter import SDXLAdapter, SDXLConfig

    broken = tmp_path / "pipe"
    shutil.copytree(tiny_sdxl, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    with pytest.raises(NitroFusionError, match=r"cannot load .*unet as UNet2DConditionModel .*fetch that folder"):
        SDXLAdapter(broken, SDXLConfig(resolution=64))
