"""The SD3 / SD3.5 DiT family (a rectified flow) on a tiny random StableDiffusion3Pipeline: the flow arithmetic
(docs/method.md §8), the 1-4 step scheduler in the stock pipeline, the adapter and teacher sampler against the
stock pipeline, the transformer backbone's taps, distillation with resume, generate and export, bad input."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import PROMPTS, generate
from safetensors.torch import load_file

from nitrofusion.cli import main
from nitrofusion.method.diffusion import RectifiedFlow
from nitrofusion.sampling.spec import SamplerSpec


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(teacher folder, prompt file, a 2-step distillation of it)."""
    from nitrofusion.worlds.sd3.testing import build_random_sd3

    root = tmp_path_factory.mktemp("sd3")
    folder = build_random_sd3(root / "teacher")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["distill", "--preset", "sd3-tiny", "--teacher", str(folder), "--prompts", str(root / "prompts.txt"),
                 "--out", str(root / "run"), "--set", "student_optim.lr=1e-4"]) == 0
    return folder, root / "prompts.txt", root / "run"


def _adapter(folder):
    from nitrofusion.worlds.sd3.adapter import SD3Adapter
    from nitrofusion.worlds.sd3.config import SD3Config

    return SD3Adapter(folder, SD3Config(resolution=64, backbone_blocks=3, taps=[0, 2], max_sequence_length=16))


def _stock(folder):
    from diffusers import StableDiffusion3Pipeline

    from nitrofusion.worlds.sd3.pipeline import absent_text_parts

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **absent_text_parts(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_flow_path_and_its_x0_rule():
    """x_sigma = (1 - sigma) x0 + sigma n, v = n - x0, x0 = x_sigma - sigma v, sigma = t / 1000."""
    flow = RectifiedFlow(1000)
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 999])
    x_t = flow.add_noise(x0, n, t)
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * n[1])
    assert torch.equal(x_t[0], x0[0])
    torch.testing.assert_close(flow.x0(n - x0, x_t, t), x0, rtol=0, atol=1e-6)


def test_the_student_scheduler_takes_the_lcm_grid_shifted_and_steps_by_the_flow_rule():
    from nitrofusion.sampling.flow_scheduler import TimestepShiftFlowScheduler

    sched = TimestepShiftFlowScheduler(shifted_timestep=250)
    grids = {}
    for steps in (1, 2, 3, 4):
        sched.set_timesteps(steps)
        grids[steps] = (sched.unshifted_timesteps, sched.timesteps.tolist())
    assert grids == {1: ([999], [249.0]), 2: ([999, 499], [249.0, 124.0]),
                     3: ([999, 749, 499], [249.0, 187.0, 124.0]),
                     4: ([999, 749, 499, 249], [249.0, 187.0, 124.0, 62.0])}
    sched.set_timesteps(2)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = sched.step(v, sched.timesteps[0], x, generator=torch.Generator().manual_seed(1)).prev_sample
    x0 = x - 0.249 * v  # read at the conditioning sigma 249/1000
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, 0.501 * x0 + 0.499 * noise, rtol=0, atol=1e-6)  # to the unshifted 499
    last = sched.step(v, sched.timesteps[1], out).prev_sample
    torch.testing.assert_close(last, out - 0.124 * v, rtol=0, atol=1e-6)


def test_prompt_encoding_and_the_null_prompt_are_the_stock_pipelines(sd3):
    folder, _, _ = sd3
    adapter = _adapter(folder)
    cond = adapter.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = _stock(folder).encode_prompt(
            PROMPTS[:2], PROMPTS[:2], PROMPTS[:2], device="cpu", do_classifier_free_guidance=True,
            max_sequence_length=16)
    assert torch.equal(cond["prompt_embeds"], embeds), (cond["prompt_embeds"] - embeds).abs().max()
    assert torch.equal(cond["pooled_projections"], pooled), (cond["pooled_projections"] - pooled).abs().max()
    null = adapter.null_cond(cond)  # encoded once, batch 1; the pipeline encodes it per batch (float rounding)
    torch.testing.assert_close(null["prompt_embeds"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(null["pooled_projections"], negative_pooled, rtol=0, atol=1e-6)


def test_the_guided_teacher_sampler_is_the_stock_pipeline(sd3):
    from nitrofusion.sampling.teacher import _scheduler

    folder, _, _ = sd3
    adapter, pipe = _adapter(folder), _stock(folder)
    spec = SamplerSpec("FlowMatchEulerDiscreteScheduler", 4, 3.0)
    pipe.scheduler = _scheduler(spec, dict(pipe.scheduler.config))
    x_T = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = adapter.teacher_sample(x_T, adapter.encode_prompts(PROMPTS[:2]), spec)
    with torch.no_grad():
        ref = pipe(PROMPTS[:2], latents=x_T.clone(), guidance_scale=3.0, output_type="latent", height=64, width=64,
                   num_inference_steps=4, max_sequence_length=16).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_the_backbone_taps_are_the_transformers_own_block_outputs_on_their_grid(sd3):
    folder, _, _ = sd3
    adapter = _adapter(folder)
    tr = adapter.teacher_unet
    captured = {}
    hooks = [tr.transformer_blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[1]))
             for i in (0, 2)]
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, t = adapter.encode_prompts(PROMPTS[:2]), torch.tensor([250, 750])
    with torch.no_grad():
        adapter.unet_call(tr, x, t, cond)
        for h in hooks:
            h.remove()
        feats = adapter.backbone_call(adapter.make_backbone(), x, t, cond, None)
    assert [f.shape for f in feats] == [(2, 32, 4, 4)] * 2  # inner width 32 on the 4x4 patch grid
    for f, i in zip(feats, (0, 2), strict=True):
        assert torch.equal(f, captured[i].transpose(1, 2).reshape(2, 32, 4, 4))


def test_distillation_writes_a_flow_student_and_resume_reaches_the_same_weights(sd3, tmp_path):
    from diffusers import SD3Transformer2DModel

    folder, prompts, run = sd3
    sched = json.loads((run / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "TimestepShiftFlowScheduler" and sched["shifted_timestep"] == 250
    student = SD3Transformer2DModel.from_pretrained(run / "student" / "transformer").state_dict()
    teacher = SD3Transformer2DModel.from_pretrained(folder / "transformer").state_dict()
    assert sum(not torch.equal(v, student[k]) for k, v in teacher.items()) > 50
    base = ["distill", "--preset", "sd3-tiny", "--teacher", str(folder), "--prompts", str(prompts)]
    assert main([*base, "--out", str(tmp_path / "straight"), "--set", "max_images=8"]) == 0
    assert main([*base, "--out", str(tmp_path / "split"), "--set", "max_images=4"]) == 0
    assert main(["distill", "--out", str(tmp_path / "split"), "--resume", "--set", "max_images=8"]) == 0
    a, b = (load_file(str(tmp_path / r / "student" / "transformer" / "diffusion_pytorch_model.safetensors"))
            for r in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("steps", [1, 4])
def test_the_stock_pipeline_is_the_training_time_sampler(sd3, steps):
    from nitrofusion.sampling.student import generate
    from nitrofusion.worlds.sd3.pipeline import load_pipeline

    folder, _, run = sd3
    pipe, adapter = load_pipeline(run), _adapter(folder)
    assert type(pipe.scheduler).__name__ == "TimestepShiftFlowScheduler"
    pipe.scheduler.generator = torch.Generator().manual_seed(9)  # the re-noising noise (the stock call passes none)
    with torch.no_grad():
        ref = pipe("a red cat", num_inference_steps=steps, guidance_scale=0.0, output_type="latent", height=64,
                   width=64, max_sequence_length=16, generator=torch.Generator().manual_seed(5)).images
    x_T = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = generate(adapter, pipe.transformer, x_T, adapter.encode_prompts(["a red cat"]), steps, 250,
                    generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)




def test_generate_and_the_exported_folder_in_a_stock_pipeline_agree(sd3, tmp_path):
    from nitrofusion.worlds import world_of_model
    from nitrofusion.worlds.pipelines.pipeline import image_generators

    _, _, run = sd3
    ours = generate(run, tmp_path / "gen")
    assert [im.shape for im in ours] == [(64, 64, 3)] * 3
    assert all(np.array_equal(a, b) for a, b in zip(generate(run, tmp_path / "again"), ours, strict=True))
    assert not np.array_equal(generate(run, tmp_path / "one", steps=1)[0], ours[0])
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 0
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["scheduler"] == ["nitrofusion", "TimestepShiftFlowScheduler"]
    assert world_of_model(tmp_path / "exp").name == "sd3" and world_of_model(run).name == "sd3"
    pipe = _stock(tmp_path / "exp")
    pipe.scheduler.generator = image_generators(3, 0, 3)
    with torch.no_grad():
        stock = pipe(PROMPTS, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=256,
                     generator=pipe.scheduler.generator).images
    assert all(np.array_equal(np.asarray(s), o) for s, o in zip(stock, ours, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(generate(tmp_path / "exp", tmp_path / "g2"), ours, strict=True))


def test_the_app_generator(sd3):
    from nitrofusion.worlds import GenerateOptions, world_of_model

    _, _, run = sd3
    generate, examples = world_of_model(run).live_generator(run, GenerateOptions(), 64)
    a, b = generate("a red cat", 2, 7), generate("a red cat", 2, 7)
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b)) and examples


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "sd3-tiny", "--teacher", "SDXL"], "is an SDXL pipeline (StableDiffusionXLPipeline), but world "
                                                    "'sd3' needs an SD3 pipeline (StableDiffusion3Pipeline)"),
    (["--preset", "sdxl-tiny", "--teacher", "SD3"], "is an SD3 pipeline (StableDiffusion3Pipeline), but world "
                                                    "'sdxl' needs an SDXL pipeline"),
    (["--preset", "sd3-tiny", "--teacher", "SD3", "--set", "sd3.taps=[0,5]"],
     "sd3.taps [5] out of range: a tapped block must be below sd3.backbone_blocks (3)"),
    (["--preset", "sd3-tiny", "--teacher", "SD3", "--set", "sd3.backbone_blocks=9", "--set", "sd3.taps=[8]"],
     "sd3.backbone_blocks 9 is more than the teacher's 4 transformer blocks"),
    (["--preset", "sd3-tiny", "--teacher", "SD3", "--set", "student.kind=lora", "--set",
      "student.targets=[to_q,conv1]"],
     "student.targets: 'conv1' matches no layer of the transformer; valid names include"),
])
def test_bad_input_is_one_line_and_writes_no_student(sd3, tiny_sdxl, tmp_path, capsys, argv, needle):
    folder, prompts, _ = sd3
    argv = [{"SDXL": str(tiny_sdxl), "SD3": str(folder)}.get(a, a) for a in argv]
    assert main(["distill", *argv, "--prompts", str(prompts), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "student").exists()


@pytest.fixture(scope="module")
def sd3_file(sd3, tmp_path_factory):
    """(the run's single-file export, what `export` printed)."""
    import contextlib
    import io

    _, _, run = sd3
    path = tmp_path_factory.mktemp("sd3-file") / "nitro-sd3.safetensors"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", str(run), "--format", "single-file", "--out", str(path)]) == 0
    return path, out.getvalue()


def test_single_file_export_has_the_original_layout_and_converts_back_bitwise(sd3, sd3_file):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors import safe_open

    from nitrofusion.worlds import world_of_model
    from nitrofusion.worlds.pipelines.pipeline import SHIFT_METADATA_KEY

    folder, _, run = sd3
    path, printed = sd3_file
    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    prefixes = {"model.diffusion_model.", "first_stage_model.", "text_encoders.clip_l.transformer.",
                "text_encoders.clip_g.transformer."}  # no T5: the tiny pipeline has none
    assert all(k.startswith(tuple(prefixes)) for k in sd) and all(any(k.startswith(p) for k in sd) for p in prefixes)
    mmdit = {k.removeprefix("model.diffusion_model.") for k in sd if k.startswith("model.diffusion_model.")}
    assert {"pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.2.bias", "y_embedder.mlp.0.weight",
            "context_embedder.weight", "joint_blocks.0.x_block.attn.qkv.weight",
            "joint_blocks.0.x_block.attn.proj.bias", "joint_blocks.0.context_block.adaLN_modulation.1.weight",
            "joint_blocks.3.x_block.mlp.fc2.weight", "final_layer.linear.weight",
            "final_layer.adaLN_modulation.1.bias"} <= mmdit
    assert not any(k.startswith("joint_blocks.3.context_block.mlp") for k in mmdit)  # the last text stream ends early
    assert sd["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape == (96, 32)  # q, k, v packed
    assert meta[SHIFT_METADATA_KEY] == "250" and meta["modelspec.architecture"] == "stable-diffusion-v3-medium"
    assert meta["nitrofusion.sampling"].startswith("TimestepShiftFlowScheduler, shifted_timestep=250")
    assert "exact for all 369 tensors" in printed and "CLIP-L's text_projection is not the identity" in printed
    assert world_of_model(path).name == "sd3"
    # diffusers' converter and its from_single_file (offline, local configs) give back the run's transformer bitwise
    student = load_file(str(run / "student" / "transformer" / "diffusion_pytorch_model.safetensors"))
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(sd))
    assert back.keys() == student.keys() and all(torch.equal(back[k], student[k]) for k in student)
    loaded = SD3Transformer2DModel.from_single_file(str(path), config=str(run / "student"), subfolder="transformer",
                                                    local_files_only=True).state_dict()
    assert loaded.keys() == student.keys() and all(torch.equal(loaded[k], student[k]) for k in student)
    vae = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae", local_files_only=True)
    teacher_vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in teacher_vae.items())


def test_generate_from_the_single_file_is_the_runs_bitwise(sd3, sd3_file, tmp_path):
    folder, _, run = sd3
    # one image per call: batch-1 products are where a weight's alignment in memory changes the rounding
    ours = generate(run, tmp_path / "run", "--batch-size", "1", steps=1)
    from_file = generate(sd3_file[0], tmp_path / "file", "--base", str(folder), "--height", "64", "--width", "64",
                         "--batch-size", "1", steps=1)
    assert all(np.array_equal(a, b) for a, b in zip(from_file, ours, strict=True))


def test_single_file_refusals_and_failures_are_one_line_and_leave_nothing(sd3, sd3_file, tmp_path, capsys,
                                                                         monkeypatch):
    from nitrofusion import faults

    _, _, run = sd3
    for out, needle in ((tmp_path / "x.ckpt", "writes a .safetensors file; --out"),
                        (sd3_file[0], "already exists; remove it or choose another --out")):
        before = out.stat().st_mtime_ns if out.exists() else None
        assert main(["export", str(run), "--format", "single-file", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert (out.stat().st_mtime_ns if out.exists() else None) == before
    faults.reset()  # the disk fills once the file is written, before its rename into place
    monkeypatch.setenv("NITROFUSION_DISK_FULL_AT", "export-write")
    out = tmp_path / "full.safetensors"
    assert main(["export", str(run), "--format", "single-file", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write the export to {out} (No space left on device" in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_single_file_with_a_base_of_the_other_family_is_one_line(sd3, sd3_file, tiny_sdxl, tmp_path, capsys):
    folder, _, _ = sd3
    sdxl_file = tmp_path / "sdxl.safetensors"
    assert main(["export", str(tiny_sdxl), "--format", "single-file", "--shift", "250", "--out", str(sdxl_file)]) == 0
    capsys.readouterr()
    cases = [(sd3_file[0], tiny_sdxl, "is an SD3 transformer but --base {} is an SDXL pipeline "
                                      "(StableDiffusionXLPipeline)"),
             (sdxl_file, folder, "is a UNet with cross-attention width 64 but --base {} is an SD3 pipeline "
                                 "(StableDiffusion3Pipeline)")]
    for model, base, needle in cases:
        out = tmp_path / f"out-{model.stem}"
        assert main(["generate", "--model", str(model), "--base", str(base), "--prompt", "a", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{model} {needle.format(base)}" in err and len(err.splitlines()) == 1, err
        assert not list(out.glob("*.png"))


def test_the_transformer_map_holds_sd3_and_both_sd35_layouts():
    """SD3 (no q/k norm), SD3.5 Large (RMS q/k norms) and SD3.5 Medium (MMDiT-X: dual attention in the image
    stream) in miniature: the original names, and diffusers' converter gives every tensor back bitwise."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from nitrofusion.worlds.sd3.export import architecture, transformer_to_original
    from nitrofusion.worlds.sd3.testing import sd3_transformer_config

    variants = [({}, "stable-diffusion-v3-medium", set()),
                ({"qk_norm": "rms_norm"}, "stable-diffusion-v3.5-large",
                 {"joint_blocks.1.context_block.attn.ln_k.weight"}),
                ({"qk_norm": "rms_norm", "dual_attention_layers": (0,)}, "stable-diffusion-v3.5-medium",
                 {"joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.0.x_block.attn2.ln_q.weight",
                  "joint_blocks.0.x_block.attn2.proj.bias"})]
    for extra, arch, keys in variants:
        torch.manual_seed(0)
        model = SD3Transformer2DModel(**(sd3_transformer_config(2) | extra))
        state = model.state_dict()
        original = transformer_to_original(state, model.config)
        assert architecture(model.config) == arch and keys <= original.keys()
        assert not any("attn2" in k for k in original if k.startswith("joint_blocks.1."))
        back = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v
                                                                for k, v in original.items()})
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state), arch


def test_t5_goes_in_under_its_own_prefix_and_diffusers_loads_it_back(tmp_path):
    """A pipeline with T5 (the tiny test pipeline has none): text_encoders.t5xxl.transformer.*, its tied embedding
    under both names (diffusers' T5 loader needs both), checked by the export's own round trip."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import create_diffusers_t5_model_from_checkpoint
    from transformers import T5Config, T5EncoderModel

    from nitrofusion.worlds.sd3.export import pipeline_to_original, verify_round_trip
    from nitrofusion.worlds.sd3.pipeline import load_pipeline
    from nitrofusion.worlds.sd3.testing import build_random_sd3

    folder = build_random_sd3(tmp_path / "sd3", layers=2)
    pipe = load_pipeline(folder, shift=250)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2)).eval()
    t5.save_pretrained(tmp_path / "config" / "text_encoder_3")
    parts = {n: getattr(pipe, n) for n in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    with_t5 = SimpleNamespace(**parts, text_encoder_3=t5)
    sd = pipeline_to_original(with_t5)
    t5_keys = {k.removeprefix("text_encoders.t5xxl.transformer.") for k in sd if k.startswith("text_encoders.t5xxl.")}
    assert t5_keys == set(t5.state_dict()) and {"shared.weight", "encoder.embed_tokens.weight"} <= t5_keys
    assert verify_round_trip(sd, with_t5) == verify_round_trip(pipeline_to_original(pipe), pipe) + len(t5_keys)
    loaded = create_diffusers_t5_model_from_checkpoint(T5EncoderModel, sd, config=str(tmp_path / "config"),
                                                       subfolder="text_encoder_3", local_files_only=True).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, t5(ids).last_hidden_state)


def test_a_transformer_weights_file_generates_through_base(sd3, tmp_path):
    """How a distilled DiT is usually shared: the transformer's diffusers state dict, sampled with --base."""
    from safetensors.torch import save_file

    from nitrofusion.worlds import world_of_model
    from nitrofusion.worlds.pipelines.pipeline import SHIFT_METADATA_KEY

    folder, _, run = sd3
    state = load_file(str(run / "student" / "transformer" / "diffusion_pytorch_model.safetensors"))
    path = tmp_path / "nitro-sd3.safetensors"
    save_file(state, str(path), metadata={SHIFT_METADATA_KEY: "250"})
    assert world_of_model(path).name == "sd3"
    ours = generate(run, tmp_path / "run")
    from_file = generate(path, tmp_path / "file", "--base", str(folder), "--height", "64", "--width", "64")
    assert all(np.array_equal(a, b) for a, b in zip(from_file, ours, strict=True))


def test_options_of_the_unet_families_are_refused_in_one_line(sd3, tmp_path, capsys):
    _, _, run = sd3
    assert main(["generate", "--model", str(run), "--prompt", "a", "--fast", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--fast does not apply to" in err and "sd3-world model; drop it" in err and len(err.splitlines()) == 1


# ---- LoRA students: adapters on the teacher's own transformer -------------------------------------------------

LORA = ("student.kind=lora", "student.rank=4", "student.alpha=8", "student_optim.lr=1e-2")
# world sd3's default targets, as module paths inside a joint block
ADAPTED = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2"}


def _lora_cfg(folder, prompts, *sets):
    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig

    return config.build(DistillConfig, "distill", "sd3-tiny", [f"teacher={folder}", f"prompts.source={prompts}",
                                                                 *LORA, *sets])


@pytest.fixture(scope="module")
def sd3_lora(sd3, tmp_path_factory):
    """(the adapter the LoRA runs share, their teacher pairs, a LoRA run): trained in this process, as the CLI
    trains, so the teacher module itself can be looked at after the run."""
    from nitrofusion.data.pair_cache import training_data
    from nitrofusion.training import distill
    from nitrofusion.worlds import world_named
    from nitrofusion.worlds.sd3.adapter import SD3Adapter

    folder, prompts, _ = sd3
    cfg = _lora_cfg(folder, prompts)
    adapter = SD3Adapter(folder, cfg.sd3)
    data = training_data(cfg, adapter, world_named("sd3").prompts(cfg, verbose=False))
    run = tmp_path_factory.mktemp("sd3-lora") / "run"
    distill(cfg, adapter, data, run, progress=False)
    return adapter, data, run


def _last_checkpoint(run, part="student"):
    return load_file(str(sorted((run / "checkpoints").iterdir())[-1] / f"{part}.safetensors"))


def test_a_lora_student_is_the_teachers_transformer_and_only_its_adapters_train(sd3, sd3_lora):
    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.models.student import has_lora, remove_lora, trainable_state
    from nitrofusion.training import build_student
    from nitrofusion.worlds.sd3.config import SD3_LORA_TARGETS

    folder, _, _ = sd3
    adapter, _, run = sd3_lora
    # after the run the adapter's transformer is the plain teacher again: bitwise the teacher folder's file
    teacher = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    now = adapter.teacher_unet.state_dict()
    assert not has_lora(adapter.teacher_unet) and now.keys() == teacher.keys()
    assert all(torch.equal(now[k], teacher[k]) for k in teacher)
    # the student IS that module with fp32 adapters on the world's default targets; only the adapters need grads
    cfg = config.load(DistillConfig, run / "config.yaml")
    assert cfg.student.targets == SD3_LORA_TARGETS
    storage = {p.data_ptr() for p in adapter.teacher_unet.parameters()}
    student = build_student(cfg, adapter)
    try:
        assert student is adapter.teacher_unet
        lora = trainable_state(student)
        assert {n for n, p in student.named_parameters() if p.requires_grad} == set(lora)
        assert all(p.dtype == torch.float32 for p in lora.values())
        assert {p.data_ptr() for n, p in student.named_parameters() if n not in lora} == storage
        assert {n.split(".lora_")[0].split(".", 2)[2] for n in lora} == ADAPTED
        names = set(lora)
    finally:
        remove_lora(student)
    # what the run trained and saved: the adapters alone. B starts at zero and moved wherever a gradient reaches:
    # everywhere but the last block's text-query projection, whose text outputs that (context_pre_only) block drops
    saved = _last_checkpoint(run)
    assert saved.keys() == names
    idle = {k for k, v in saved.items() if ".lora_B." in k and not torch.count_nonzero(v)}
    assert idle == {"transformer_blocks.3.attn.add_q_proj.lora_B.nitrofusion.weight"}
    # the run's student/transformer (adapters merged) differs from the teacher in the adapted layers' weights only
    merged = load_file(str(run / "student" / "transformer" / "diffusion_pytorch_model.safetensors"))
    moved = {k for k in teacher if not torch.equal(merged[k], teacher[k])}
    assert {k.removesuffix(".weight").split(".", 2)[2] for k in moved} == ADAPTED
    assert all(k.endswith(".weight") for k in moved)


def test_a_resumed_lora_run_reaches_the_uninterrupted_runs_adapters(sd3, sd3_lora, tmp_path):
    from nitrofusion.training import distill

    folder, prompts, _ = sd3
    adapter, data, run = sd3_lora
    distill(_lora_cfg(folder, prompts, "max_images=4"), adapter, data, tmp_path, progress=False)
    distill(_lora_cfg(folder, prompts), adapter, data, tmp_path, resume=True, progress=False)
    a, b = _last_checkpoint(run), _last_checkpoint(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(r / "student" / "lora" / "pytorch_lora_weights.safetensors")) for r in (run, tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_stock_pipeline_with_the_runs_lora_is_generate_and_the_training_time_student(sd3, sd3_lora, tmp_path):
    """Stock StableDiffusion3Pipeline of the teacher folder + load_lora_weights(run/student/lora) + the run's
    scheduler gives generate's PNGs bit for bit; its transformer gives the training-time student's output bitwise."""
    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.models.student import base_only, load_trainable_state, remove_lora
    from nitrofusion.sampling.flow_scheduler import TimestepShiftFlowScheduler
    from nitrofusion.training import build_student
    from nitrofusion.worlds.pipelines.pipeline import image_generators

    folder, _, _ = sd3
    adapter, _, run = sd3_lora
    ours = generate(run, tmp_path / "gen", steps=1)
    pipe = _stock(folder)
    pipe.load_lora_weights(str(run / "student" / "lora"))
    pipe.scheduler = TimestepShiftFlowScheduler.from_pretrained(run / "student" / "scheduler")
    pipe.scheduler.generator = image_generators(3, 0, 3)  # as generate seeds image i: seed 3 + i
    with torch.no_grad():
        stock = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0.0, height=64, width=64,
                     generator=pipe.scheduler.generator).images
    assert all(np.array_equal(np.asarray(s), o) for s, o in zip(stock, ours, strict=True))
    # the training-time student: the teacher module with our adapters, the last checkpoint's factors loaded
    student = build_student(config.load(DistillConfig, run / "config.yaml"), adapter).eval()
    try:
        load_trainable_state(student, _last_checkpoint(run))
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        cond, t = adapter.encode_prompts(PROMPTS[:2]), torch.tensor([249, 249])
        with torch.no_grad():
            want = adapter.unet_call(student, x, t, cond)
            with base_only(student):
                plain = adapter.unet_call(student, x, t, cond)
            got = adapter.unet_call(pipe.transformer, x, t, cond)
    finally:
        remove_lora(student)
    assert torch.equal(got, want) and not torch.equal(got, plain)


def test_export_lora_hands_on_the_runs_adapters_in_diffusers_sd3_format(sd3, sd3_lora, tmp_path, capsys):
    from safetensors import safe_open

    from nitrofusion.worlds import world_named, world_of_model
    from nitrofusion.worlds.pipelines.pipeline import SHIFT_METADATA_KEY
    from nitrofusion.worlds.sd3.config import SD3_LORA_TARGETS

    folder, _, _ = sd3
    _, _, run = sd3_lora
    assert world_named("sd3").export_formats_for(run) == ("diffusers", "single-file", "lora")
    out = tmp_path / "lora"
    assert main(["export", str(run), "--format", "lora", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LoRA rank 4 (alpha 4) on" in printed  # trained at alpha 8: alpha/rank = 2 folded into lora_B
    path = out / "pytorch_lora_weights.safetensors"
    trained = run / "student" / "lora" / "pytorch_lora_weights.safetensors"
    factors, given = load_file(str(path)), load_file(str(trained))  # the same tensors and header (its order aside)
    assert factors.keys() == given.keys() and all(torch.equal(factors[k], given[k]) for k in factors)
    with safe_open(str(path), "pt") as f, safe_open(str(trained), "pt") as g:
        assert f.metadata() == g.metadata()
    assert all(k.startswith("transformer.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in factors)
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in factors
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    adapter_meta = json.loads(meta["lora_adapter_metadata"])  # diffusers' own, read back by load_lora_weights
    assert adapter_meta["transformer.r"] == 4 and adapter_meta["transformer.lora_alpha"] == 4
    assert set(adapter_meta["transformer.target_modules"]) == set(SD3_LORA_TARGETS)
    assert meta[SHIFT_METADATA_KEY] == "250"
    report = json.loads((out / "lora_report.json").read_text())
    assert report["rank"] == 4 and report["alpha"] == 4 and "exact" in report["source"]
    assert report["lora_layers"] == len(factors) // 2 and f"on {len(factors) // 2} layers" in printed
    # the file alone, with the teacher as --base (its shift from the metadata), generates the run's images
    assert world_of_model(path).name == "sd3"
    ours = generate(run, tmp_path / "run", steps=1)
    from_file = generate(path, tmp_path / "file", "--base", str(folder), "--height", "64", "--width", "64", steps=1)
    assert all(np.array_equal(a, b) for a, b in zip(from_file, ours, strict=True))
    assert main(["export", str(run), "--format", "lora", "--rank", "4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained LoRA adapters, which export hands on exactly; drop --rank" in err and len(err.splitlines()) == 1


def test_a_lora_of_the_other_family_is_one_line_before_weights_load(sd3, sd3_lora, tiny_sdxl, tmp_path, capsys,
                                                                    monkeypatch):
    import diffusers
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder, prompts, _ = sd3
    _, _, run = sd3_lora
    sd3_file = run / "student" / "lora" / "pytorch_lora_weights.safetensors"
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "sdxl", unet_lora_layers=get_peft_model_state_dict(unet))
    sdxl_file = tmp_path / "sdxl" / "pytorch_lora_weights.safetensors"

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    for cls in (diffusers.ModelMixin, diffusers.DiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(no_loading))
    cases = [(["generate", "--model", str(sd3_file), "--base", str(tiny_sdxl), "--prompt", "a"],
              f"{sd3_file} is a LoRA of an SD3 transformer but --base {tiny_sdxl} is an SDXL pipeline "
              "(StableDiffusionXLPipeline)"),
             (["generate", "--model", str(sdxl_file), "--base", str(folder), "--prompt", "a"],
              f"{sdxl_file} is a UNet LoRA with cross-attention width 64 but --base {folder} is an SD3 pipeline "
              "(StableDiffusion3Pipeline)"),
             (["distill", "--preset", "sd3-tiny", "--teacher", str(folder), "--set", "student.kind=lora",
               "--set", f"student_init={sdxl_file}"],
              f"student_init {sdxl_file} holds a LoRA of a UNet, but world 'sd3' trains an SD3 transformer"),
             (["distill", "--preset", "sdxl-tiny", "--teacher", str(tiny_sdxl), "--set", "student.kind=lora",
               "--set", f"student_init={sd3_file}"],
              f"student_init {sd3_file} holds a LoRA of an SD3 transformer, but world 'sdxl' trains a UNet")]
    for i, (argv, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        extra = ["--prompts", str(prompts)] if argv[0] == "distill" else []
        assert main([*argv, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not list(out.glob("*.png")) and not (out / "checkpoints").exists()


def test_transfer_is_exact_arithmetic_and_its_outputs_sample_on_the_custom_base(sd3, tiny_sdxl, tmp_path, capsys):
    """theta_custom + (theta_student - theta_base) over the transformer in fp32, key by key (docs/method.md §6);
    the folder and the file it writes give the same images on the custom base; a UNet family's folder among the
    three is one line."""
    import shutil

    from safetensors.torch import save_file

    folder, _, run = sd3
    custom = tmp_path / "custom"
    shutil.copytree(folder, custom)
    weights = custom / "transformer" / "diffusion_pytorch_model.safetensors"
    base = load_file(str(weights))
    gen = torch.Generator().manual_seed(3)
    fine_tuned = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    save_file(fine_tuned, str(weights))
    common = ["transfer", "--student", str(run), "--base", str(folder), "--custom", str(custom)]
    assert main([*common, "--out", str(tmp_path / "moved")]) == 0
    assert main([*common, "--out", str(tmp_path / "moved.safetensors")]) == 0
    student = load_file(str(run / "student" / "transformer" / "diffusion_pytorch_model.safetensors"))
    moved = load_file(str(tmp_path / "moved" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert moved.keys() == student.keys()
    assert all(torch.equal(moved[k], fine_tuned[k].float() + (student[k].float() - base[k].float())) for k in student)
    assert all(torch.equal(moved[k], v) for k, v in load_file(str(tmp_path / "moved.safetensors")).items())
    size = ["--base", str(custom), "--height", "64", "--width", "64", "--batch-size", "1"]
    from_folder = generate(tmp_path / "moved", tmp_path / "a", *size, steps=1)
    from_file = generate(tmp_path / "moved.safetensors", tmp_path / "b", *size, steps=1)  # the shift from its header
    assert all(np.array_equal(a, b) for a, b in zip(from_folder, from_file, strict=True))
    capsys.readouterr()
    assert main([*common[:-1], str(tiny_sdxl), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no SD3 transformer" in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
