"""The Stable Diffusion 1.x / 2.x family on tiny random pipelines (worlds/sd/testing.py), epsilon (sd1 layout)
and v-prediction (sd2 layout): the adapter against the stock pipeline, distillation, 1-4 step generation through
a stock StableDiffusionPipeline, diffusers / single-file / LoRA export, the app's generator, and bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nitrofusion.cli import main
from nitrofusion.errors import NitroFusionError
from nitrofusion.sampling.spec import SamplerSpec

PROMPTS = ["a red cat", "a photo of a dog", "an astronaut riding a horse"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family(request, tmp_path_factory):
    """(variant, teacher folder, a 2-step distillation of it)."""
    from nitrofusion.worlds.sd.testing import build_random_sd

    root = tmp_path_factory.mktemp(request.param)
    folder = build_random_sd(root / "teacher", request.param)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["distill", "--preset", "sd-tiny", "--teacher", str(folder), "--prompts", str(root / "prompts.txt"),
                 "--out", str(root / "run"), "--set", "student_optim.lr=1e-4"]) == 0
    return request.param, folder, root / "run"


def _adapter(folder):
    from nitrofusion.worlds.sd.adapter import SDAdapter
    from nitrofusion.worlds.sd.config import SDConfig

    return SDAdapter(folder, SDConfig(resolution=64))


def _stock(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(model, out, *extra, steps=2, seed=3):
    argv = ["generate", "--model", str(model), "--steps", str(steps), "--seed", str(seed), "--out", str(out)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert main(argv + list(extra)) == 0
    return [np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(len(PROMPTS))]


def test_backbone_has_thirteen_levels_in_the_sd15_layout():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from nitrofusion.method.backbone import UNetBackbone

    with init_empty_weights():  # SD 1.5's UNet config, no weights
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                    attention_head_dim=8)
    assert UNetBackbone(unet).channels == [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280]


def test_prompt_encoding_and_the_null_prompt_match_the_stock_pipeline(family):
    _, folder, _ = family
    adapter = _adapter(folder)
    cond = adapter.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        embeds, negative = _stock(folder).encode_prompt(PROMPTS[:2], "cpu", 1, True)
    assert cond.keys() == {"prompt_embeds"} and torch.equal(cond["prompt_embeds"], embeds)
    assert torch.equal(adapter.null_cond(cond)["prompt_embeds"], negative)  # the empty prompt, as CFG uses


@pytest.mark.parametrize("spec", [SamplerSpec("ddim", 4, 3.0, "trailing"), SamplerSpec("dpmsolver++", 5, 7.5)])
def test_the_guided_teacher_sampler_matches_the_stock_pipeline(family, spec):
    """Classifier-free guidance with the empty prompt, epsilon and v-prediction, on the same noise."""
    from nitrofusion.sampling.teacher import _scheduler

    _, folder, _ = family
    adapter, pipe = _adapter(folder), _stock(folder)
    pipe.scheduler = _scheduler(spec, dict(pipe.scheduler.config))
    x_T = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = adapter.teacher_sample(x_T, adapter.encode_prompts(PROMPTS[:2]), spec)
    with torch.no_grad():
        ref = pipe(PROMPTS[:2], latents=x_T.clone(), guidance_scale=spec.guidance_scale, output_type="latent",
                   height=64, width=64, num_inference_steps=spec.steps).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_distillation_trains_the_student_and_writes_its_scheduler(family):
    from diffusers import UNet2DConditionModel

    variant, folder, run = family
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and not any(e["skipped"] for e in log)
    student = UNet2DConditionModel.from_pretrained(run / "student" / "unet").state_dict()
    teacher = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    assert sum(not torch.equal(v, student[k]) for k, v in teacher.items()) > 50
    sched = json.loads((run / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "TimestepShiftLCMScheduler" and sched["shifted_timestep"] == 250
    assert sched["prediction_type"] == ("v_prediction" if variant == "sd2" else "epsilon")


@pytest.mark.parametrize("steps", [1, 4])
def test_the_pipeline_is_the_training_time_sampler(family, steps):
    from nitrofusion import load_pipeline
    from nitrofusion.sampling.student import generate

    _, folder, run = family
    pipe, adapter = load_pipeline(run), _adapter(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    with torch.no_grad():
        ref = pipe("a red cat", num_inference_steps=steps, guidance_scale=0.0, output_type="latent", height=64,
                   width=64, generator=[torch.Generator().manual_seed(5)]).images
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(1, 4, 32, 32, generator=g)
    ours = generate(adapter, pipe.unet, x_T, adapter.encode_prompts(["a red cat"]), steps, 250, generator=g)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_generate_export_and_a_stock_pipeline_agree(family, tmp_path):
    from nitrofusion.worlds.pipelines.pipeline import image_generators

    _, folder, run = family
    ours = _generate(run, tmp_path / "gen")
    assert [im.shape for im in ours] == [(64, 64, 3)] * 3
    assert not np.array_equal(ours[0], _generate(run, tmp_path / "s4", steps=4)[0])
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = _stock(tmp_path / "exp")
    assert type(pipe.scheduler).__name__ == "TimestepShiftLCMScheduler"
    with torch.no_grad():
        stock = pipe(PROMPTS, num_inference_steps=2, guidance_scale=0.0, generator=image_generators(3, 0, 3)).images
    assert all(np.array_equal(np.asarray(s), o) for s, o in zip(stock, ours, strict=True))


def test_single_file_export_round_trips_and_loads_with_from_single_file(family, tmp_path):
    from diffusers import StableDiffusionPipeline

    variant, folder, run = family
    path = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--format", "single-file", "--out", str(path)]) == 0
    sd = load_file(str(path))
    text = "cond_stage_model.model." if variant == "sd2" else "cond_stage_model.transformer.text_model."
    prefixes = ("model.diffusion_model.", "first_stage_model.", text)
    assert all(k.startswith(prefixes) for k in sd) and all(any(k.startswith(p) for k in sd) for p in prefixes)
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in sd  # SD's attention in the first block
    ours = _generate(run, tmp_path / "run")  # the single file's UNet (shift from its metadata), through --base
    assert all(np.array_equal(a, b) for a, b in zip(
        _generate(path, tmp_path / "single", "--base", str(folder)), ours, strict=True))
    exported = tmp_path / "exp"
    assert main(["export", str(run), "--format", "diffusers", "--out", str(exported)]) == 0
    single = StableDiffusionPipeline.from_single_file(str(path), config=str(exported), local_files_only=True,
                                                      safety_checker=None)
    own = _stock(exported)
    for name in ("unet", "vae", "text_encoder"):
        a, b = ({k: v for k, v in getattr(p, name).state_dict().items() if not k.endswith("position_ids")}
                for p in (own, single))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_lora_export_loads_into_a_stock_pipeline_and_through_base(family, tmp_path):
    from nitrofusion.worlds.pipelines.export import KOHYA_LORA_FILE

    _, folder, run = family
    assert main(["export", str(run), "--format", "lora", "--rank", "64", "--out", str(tmp_path / "lora")]) == 0
    kohya = load_file(str(tmp_path / "lora" / KOHYA_LORA_FILE))
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in kohya)  # sd-scripts' SD 1.x/2.x names
    ours = _generate(run, tmp_path / "run")
    via_lora = _generate(tmp_path / "lora" / KOHYA_LORA_FILE, tmp_path / "kohya", "--base", str(folder))
    # rank 64 holds every tiny layer exactly; norms and biases (not in a LoRA) keep the images close, not equal
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() < 8 for a, b in zip(ours, via_lora, strict=True))
    pipe = _stock(folder)
    pipe.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own loader takes the PEFT file
    assert any("lora_A" in n for n, _ in pipe.unet.named_parameters())


def test_the_app_generator_and_the_world_registry(family):
    from nitrofusion.worlds import GenerateOptions, world_of_model

    _, _, run = family
    world = world_of_model(run)
    assert world.name == "sd" and world_of_model(run / "student").name == "sd"
    generate, examples = world.live_generator(run, GenerateOptions(), 64)
    a, b = generate("a red cat", 1, 7), generate("a red cat", 1, 7)
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b)) and examples


@pytest.mark.parametrize("preset,teacher,needle", [
    ("sd-tiny", "SDXL", "is an SDXL pipeline (StableDiffusionXLPipeline), but world 'sd' needs a Stable Diffusion "
                        "1.x/2.x pipeline (StableDiffusionPipeline)"),
    ("sdxl-tiny", "SD", "is a Stable Diffusion 1.x/2.x pipeline (StableDiffusionPipeline), but world 'sdxl' needs "
                        "an SDXL pipeline (StableDiffusionXLPipeline)"),
])
def test_a_teacher_of_the_other_family_is_one_line_naming_both(family, tiny_sdxl, tmp_path, capsys, preset, teacher,
                                                               needle):
    _, folder, run = family
    teacher = {"SDXL": tiny_sdxl, "SD": folder}[teacher]
    assert main(["distill", "--preset", preset, "--teacher", str(teacher), "--prompts",
                 str(run.parent / "prompts.txt"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "student").exists()


def test_a_unet_of_the_other_family_is_refused_through_base(family, tiny_sdxl, tmp_path, capsys):
    _, folder, run = family
    assert main(["generate", "--model", str(run / "student"), "--base", str(tiny_sdxl), "--prompt", "a",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Stable Diffusion 1.x/2.x UNet, but its base is an SDXL pipeline" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("sets,needle", [
    (["sdxl.teacher_unet=/x.safetensors"], "sdxl.* applies to world 'sdxl'; this run is world 'sd'"),
    (["sd.resolution=60"], "sd.resolution must be a positive multiple of 8"),
])
def test_sd_config_errors_are_one_line(family, tmp_path, capsys, sets, needle):
    _, folder, run = family
    argv = ["distill", "--preset", "sd-tiny", "--teacher", str(folder), "--prompts", str(run.parent / "prompts.txt"),
            "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_sd_adapter_refuses_a_folder_without_a_text_encoder(family, tmp_path):
    _, folder, _ = family
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("text_encoder")
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(NitroFusionError, match="not a complete Stable Diffusion 1.x/2.x pipeline: it lacks .*text_enc"):
        _adapter(tmp_path)


def test_transfer_is_exact_arithmetic_from_folders_and_an_original_layout_file(family, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from nitrofusion.worlds.pipelines.export import unet_to_original
    from nitrofusion.worlds.sd.testing import sd_unet_config

    variant, folder, run = family
    torch.manual_seed(7)
    custom = UNet2DConditionModel(**sd_unet_config(variant))  # a "fine-tuned SD": same layout, other weights
    custom.save_pretrained(tmp_path / "custom")
    assert main(["transfer", "--student", str(run), "--base", str(folder), "--custom", str(tmp_path / "custom"),
                 "--out", str(tmp_path / "out")]) == 0
    s, b = (UNet2DConditionModel.from_pretrained(p).state_dict() for p in (run / "student" / "unet", folder / "unet"))
    c, got = custom.state_dict(), UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").state_dict()
    assert got.keys() == s.keys() and all(torch.equal(got[k], c[k] + (s[k] - b[k])) for k in s)
    save_file({"model.diffusion_model." + k: v for k, v in unet_to_original(c, custom.config).items()},
              str(tmp_path / "custom_a1111.safetensors"))
    assert main(["transfer", "--student", str(run), "--base", str(folder), "--custom",
                 str(tmp_path / "custom_a1111.safetensors"), "--out", str(tmp_path / "out.safetensors")]) == 0
    again = load_file(str(tmp_path / "out.safetensors"))
    assert again.keys() == got.keys() and all(torch.equal(again[k], got[k]) for k in got)


def test_the_fast_path_gives_the_eager_images(family):
    """Fused QKV, channels_last and the regional compile (aot_eager: the graph capture, seconds on a CPU)."""
    from nitrofusion import load_pipeline
    from nitrofusion.worlds.pipelines.fast import make_fast
    from nitrofusion.worlds.pipelines.pipeline import generate_images

    _, _, run = family
    eager, fast = load_pipeline(run), load_pipeline(run)
    applied = make_fast(fast, backend="aot_eager", log=print)
    assert applied["fused_qkv"] and applied["compiled"] == "regional"
    for steps in (1, 4):
        a, b = (np.stack([np.asarray(im, dtype=np.float32) for im in generate_images(p, PROMPTS, steps, 3)])
                for p in (eager, fast))
        assert np.abs(a - b).max() <= 1  # uint8 PNG levels: float sums in another order may round one level
