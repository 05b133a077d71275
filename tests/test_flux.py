"""The FLUX.1 family (a guidance-distilled DiT on 2x2-packed latent tokens, trained as a rectified flow) on a tiny
random FluxPipeline: prompt encoding and the teacher sampler against the stock pipeline, E's taps, the stock pipeline
driving the student's scheduler, distillation with resume, LoRA students, the T5 cache, generate and export, bad
input (docs/method.md §8, FLUX)."""

import json
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import PROMPTS, generate
from safetensors.torch import load_file

from nitrofusion.cli import main
from nitrofusion.sampling.spec import SamplerSpec

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(teacher folder, prompt file, a 2-step distillation of it)."""
    from nitrofusion.worlds.flux.testing import build_random_flux

    root = tmp_path_factory.mktemp("flux")
    folder = build_random_flux(root / "teacher")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["distill", "--preset", "flux-tiny", "--teacher", str(folder), "--prompts", str(root / "prompts.txt"),
                 "--out", str(root / "run"), "--set", "student_optim.lr=1e-4"]) == 0
    return folder, root / "prompts.txt", root / "run"


def _cfg(folder, prompts, *sets):
    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig

    return config.build(DistillConfig, "distill", "flux-tiny", [f"teacher={folder}", f"prompts.source={prompts}",
                                                                  *sets])


def _adapter(folder):
    from nitrofusion.worlds.flux.adapter import FluxAdapter
    from nitrofusion.worlds.flux.config import FluxConfig

    return FluxAdapter(folder, FluxConfig(resolution=64, backbone_blocks=2, taps=[0, 1], max_sequence_length=16))


def _stock(folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_student_scheduler_takes_fluxpipelines_sigma_call():
    """FluxPipeline calls set_timesteps(sigmas=linspace(1, 1/n, n), mu=...) without the step count: the grid is the
    LCM grid of len(sigmas) steps, shifted, whatever the sigmas and mu."""
    from nitrofusion.sampling.flow_scheduler import TimestepShiftFlowScheduler

    sched = TimestepShiftFlowScheduler(shifted_timestep=250)
    for steps in (1, 2, 4):
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=0.7)
        by_count = sched.timesteps.clone()
        sched.set_timesteps(steps)
        assert torch.equal(by_count, sched.timesteps) and len(by_count) == steps


def test_prompt_encoding_and_the_null_prompt_are_the_stock_pipelines(flux):
    folder, _, _ = flux
    adapter = _adapter(folder)
    cond = adapter.encode_prompts(PROMPTS[:2])
    pipe = _stock(folder)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS[:2], device="cpu", max_sequence_length=16)
        empty, empty_pooled, _ = pipe.encode_prompt([""], device="cpu", max_sequence_length=16)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["pooled_projections"], pooled)
    assert not text_ids.any()  # FLUX's text position ids are zeros, as the adapter builds them
    null = adapter.null_cond(cond)
    assert torch.equal(null["prompt_embeds"], empty.repeat(2, 1, 1))
    assert torch.equal(null["pooled_projections"], empty_pooled.repeat(2, 1))


def test_the_guided_teacher_sampler_is_the_stock_pipeline(flux):
    """FluxPipeline's own loop (dynamic shift mu of the token count, embedded guidance, no CFG) from the same x_T."""
    from nitrofusion.worlds.flux.tokens import pack, unpack

    folder, _, _ = flux
    adapter, pipe = _adapter(folder), _stock(folder)
    x_T = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps, guidance in ((4, 3.5), (3, 5.0)):
        spec = SamplerSpec("FlowMatchEulerDiscreteScheduler", steps, guidance)
        ours = adapter.teacher_sample(x_T, adapter.encode_prompts(PROMPTS[:2]), spec)
        with torch.no_grad():
            ref = pipe(PROMPTS[:2], latents=pack(x_T.clone()), guidance_scale=guidance, output_type="latent",
                       height=64, width=64, num_inference_steps=steps, max_sequence_length=16).images
        torch.testing.assert_close(ours, unpack(ref, 8, 8), rtol=0, atol=1e-5)
    assert not torch.allclose(ours, adapter.teacher_sample(x_T, adapter.encode_prompts(PROMPTS[:2]),
                                                           SamplerSpec("FlowMatchEulerDiscreteScheduler", 3, 1.0)))
    # printed as what it is (bench, pairs.json): the guidance embedding's scale, not classifier-free guidance; the
    # pair cache keys on the repr, which stays the config's
    assert adapter.sampler.describe() == "FLUX Euler (dynamic shift) 28 steps, embedded guidance 3.5"
    assert repr(adapter.sampler) == repr(adapter.cfg.sampler)


def test_a_schnell_teacher_samples_as_its_stock_pipeline(tmp_path):
    """FLUX.1-schnell's kind: no guidance embedder (none is passed), no shift; 4 steps, as its pipeline samples."""
    from nitrofusion.worlds.flux.testing import build_random_flux
    from nitrofusion.worlds.flux.tokens import pack, unpack

    folder = build_random_flux(tmp_path / "schnell", seed=1, layers=2, single_layers=1, schnell=True)
    adapter, pipe = _adapter(folder), _stock(folder)
    assert not adapter.teacher_unet.config.guidance_embeds
    x_T = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = adapter.teacher_sample(x_T, adapter.encode_prompts(PROMPTS[:1]),
                                  SamplerSpec("FlowMatchEulerDiscreteScheduler", 4, 0.0))
    with torch.no_grad():
        ref = pipe(PROMPTS[:1], latents=pack(x_T.clone()), guidance_scale=0.0, output_type="latent", height=64,
                   width=64, num_inference_steps=4, max_sequence_length=16).images
    torch.testing.assert_close(ours, unpack(ref, 8, 8), rtol=0, atol=1e-5)


def test_the_backbone_taps_are_the_transformers_own_double_block_outputs_on_their_grid(flux):
    folder, _, _ = flux
    adapter = _adapter(folder)
    tr = adapter.teacher_unet
    captured = {}
    hooks = [tr.transformer_blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[1]))
             for i in (0, 1)]
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, t = adapter.encode_prompts(PROMPTS[:2]), torch.tensor([250, 750])
    with torch.no_grad():
        adapter.unet_call(tr, x, t, cond)
        for h in hooks:
            h.remove()
        backbone = adapter.make_backbone()
        feats = adapter.backbone_call(backbone, x, t, cond, None)
        crop = adapter.backbone_call(backbone, x[..., :4, :4], t, cond, None)  # a crop: an image of its own size
    assert [f.shape for f in feats] == [(2, 16, 4, 4)] * 2  # inner width 16 on the 4x4 token grid
    for f, i in zip(feats, (0, 1), strict=True):
        assert torch.equal(f, captured[i].transpose(1, 2).reshape(2, 16, 4, 4))
    assert [f.shape for f in crop] == [(2, 16, 2, 2)] * 2


def test_distillation_writes_a_flow_student_and_resume_reaches_the_same_weights(flux, tmp_path):
    from nitrofusion.worlds import world_of_model

    folder, prompts, run = flux
    sched = json.loads((run / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "TimestepShiftFlowScheduler" and sched["shifted_timestep"] == 250
    assert sched["_nitrofusion_guidance"] == 3.5 and world_of_model(run).name == "flux"
    student = load_file(str(run / "student" / "transformer" / WEIGHTS))
    teacher = load_file(str(folder / "transformer" / WEIGHTS))
    assert sum(not torch.equal(v, student[k]) for k, v in teacher.items()) > 50
    base = ["distill", "--preset", "flux-tiny", "--teacher", str(folder), "--prompts", str(prompts), "--set",
            "student_optim.lr=1e-4"]
    assert main([*base, "--out", str(tmp_path / "split"), "--set", "max_images=4"]) == 0
    assert main(["distill", "--out", str(tmp_path / "split"), "--resume", "--set", "max_images=8"]) == 0
    resumed = load_file(str(tmp_path / "split" / "student" / "transformer" / WEIGHTS))
    assert resumed.keys() == student.keys() and all(torch.equal(student[k], resumed[k]) for k in student)


@pytest.mark.parametrize("steps", [1, 4])
def test_the_stock_pipeline_is_the_training_time_sampler(flux, steps):
    """A stock FluxPipeline with the run's transformer and TimestepShiftFlowScheduler (driven through its
    set_timesteps(sigmas, mu) call, stepping packed tokens) gives the training-time sampler's latent bit for bit."""
    from nitrofusion.sampling.student import generate as student_generate
    from nitrofusion.worlds.flux.pipeline import load_pipeline
    from nitrofusion.worlds.flux.tokens import unpack

    folder, _, run = flux
    pipe, adapter = load_pipeline(run), _adapter(folder)
    assert type(pipe.scheduler).__name__ == "TimestepShiftFlowScheduler" and pipe.nitrofusion_guidance == 3.5
    pipe.scheduler.generator = torch.Generator().manual_seed(9)  # the re-noising noise (the stock call passes none)
    with torch.no_grad():
        ref = pipe("a red cat", num_inference_steps=steps, guidance_scale=3.5, output_type="latent", height=64,
                   width=64, max_sequence_length=16, generator=torch.Generator().manual_seed(5)).images
    x_T = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = student_generate(adapter, pipe.transformer, x_T, adapter.encode_prompts(["a red cat"]), steps, 250,
                            generator=torch.Generator().manual_seed(9))
    assert torch.equal(ours, unpack(ref, 8, 8))


def test_generate_and_the_exported_folder_in_a_stock_pipeline_agree(flux, tmp_path):
    from nitrofusion.sampling.flow_scheduler import TimestepShiftFlowScheduler
    from nitrofusion.worlds import world_of_model
    from nitrofusion.worlds.pipelines.pipeline import image_generators

    _, _, run = flux
    ours = generate(run, tmp_path / "gen")
    assert [im.shape for im in ours] == [(64, 64, 3)] * 3
    assert not np.array_equal(generate(run, tmp_path / "one", steps=1)[0], ours[0])
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 0
    index = json.loads((tmp_path / "exp" / "model_index.json").read_text())
    assert index["scheduler"] == ["nitrofusion", "TimestepShiftFlowScheduler"]
    assert world_of_model(tmp_path / "exp").name == "flux"
    pipe = _stock(tmp_path / "exp")
    assert isinstance(pipe.scheduler, TimestepShiftFlowScheduler)
    pipe.scheduler.generator = image_generators(3, 0, 3)
    with torch.no_grad():  # FluxPipeline's default guidance_scale 3.5 is the student's embedded guidance
        stock = pipe(PROMPTS, num_inference_steps=2, height=64, width=64, generator=pipe.scheduler.generator).images
    assert all(np.array_equal(np.asarray(s), o) for s, o in zip(stock, ours, strict=True))
    size = ("--height", "64", "--width", "64")
    assert all(np.array_equal(a, b) for a, b in zip(generate(tmp_path / "exp", tmp_path / "g2", *size), ours,
                                                      strict=True))


def test_the_app_generator(flux):
    from nitrofusion.worlds import GenerateOptions, world_of_model

    _, _, run = flux
    gen, examples = world_of_model(run).live_generator(run, GenerateOptions(), 64)
    a, b = gen("a red cat", 2, 7), gen("a red cat", 2, 7)
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b)) and examples


# ---- LoRA students ---------------------------------------------------------------------------------------------


def test_a_lora_student_trains_its_adapters_only_and_gives_the_teacher_back(flux, tmp_path):
    """On the teacher's own transformer: only the adapters have gradients and are saved; after the run the
    transformer is the teacher folder's bitwise; the stock FluxPipeline + load_lora_weights(run/student/lora) is the
    training-time student bitwise."""
    from nitrofusion import config
    from nitrofusion.data.pair_cache import training_data
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.models.student import base_only, has_lora, load_trainable_state, remove_lora, trainable_state
    from nitrofusion.training import build_student, distill
    from nitrofusion.worlds import world_named
    from nitrofusion.worlds.flux.adapter import FluxAdapter
    from nitrofusion.worlds.flux.config import FLUX_LORA_TARGETS
    from nitrofusion.worlds.flux.pipeline import load_pipeline

    folder, prompts, _ = flux
    cfg = _cfg(folder, prompts, "student.kind=lora", "student.rank=4", "student.alpha=8", "student_optim.lr=1e-2")
    adapter = FluxAdapter(folder, cfg.flux)
    data = training_data(cfg, adapter, world_named("flux").prompts(cfg, verbose=False))
    run = tmp_path / "run"
    distill(cfg, adapter, data, run, progress=False)
    teacher = load_file(str(folder / "transformer" / WEIGHTS))
    now = adapter.teacher_unet.state_dict()
    assert not has_lora(adapter.teacher_unet) and now.keys() == teacher.keys()
    assert all(torch.equal(now[k], teacher[k]) for k in teacher)
    cfg = config.load(DistillConfig, run / "config.yaml")
    assert cfg.student.targets == FLUX_LORA_TARGETS
    saved = load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "student.safetensors"))
    student = build_student(cfg, adapter).eval()
    try:
        assert student is adapter.teacher_unet
        lora = trainable_state(student)
        assert {n for n, p in student.named_parameters() if p.requires_grad} == set(lora) == saved.keys()
        assert any(".single_transformer_blocks." in f".{n}" and "proj_mlp" in n for n in lora)
        load_trainable_state(student, saved)
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        cond, t = adapter.encode_prompts(PROMPTS[:2]), torch.tensor([249, 249])
        with torch.no_grad():
            want = adapter.unet_call(student, x, t, cond)
            with base_only(student):
                plain = adapter.unet_call(student, x, t, cond)
            pipe = load_pipeline(run)  # the stock pipeline of the teacher folder + the run's LoRA file
            got = adapter.unet_call(pipe.transformer, x, t, cond)
    finally:
        remove_lora(student)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    factors = load_file(str(run / "student" / "lora" / "pytorch_lora_weights.safetensors"))
    assert factors and all(k.startswith("transformer.") and ".lora_" in k for k in factors)


# ---- the T5 cache ----------------------------------------------------------------------------------------------


def test_the_t5_cache_equals_the_live_encoding(flux, tmp_path):
    from safetensors import safe_open

    from nitrofusion.data.pair_cache import training_data
    from nitrofusion.errors import NitroFusionError
    from nitrofusion.worlds import world_named
    from nitrofusion.worlds.flux.adapter import FluxAdapter

    folder, prompts, _ = flux
    cfg = _cfg(folder, prompts, f"pairs.dir={tmp_path / 'pairs'}")
    adapter = FluxAdapter(folder, cfg.flux)
    t5_bytes = sum(p.numel() * p.element_size() for p in adapter.pipe.text_encoder_2.parameters())
    training_data(cfg, adapter, world_named("flux").prompts(cfg, verbose=False))
    with safe_open(str(tmp_path / "pairs" / f"{cfg.pairs.count}-{cfg.pairs.seed}" / "shard-00000.safetensors"),
                   "pt") as f:
        stored = f.get_tensor("text.t5")
        shard_prompts = json.loads(f.metadata()["prompts"])
    live = adapter.encode_prompts(PROMPTS)
    null = adapter.null_cond(live)
    assert torch.equal(stored, adapter.cacheable_text(shard_prompts)["t5"])
    assert adapter.release_cached_encoders() == t5_bytes and adapter.pipe.text_encoder_2 is None
    cached = adapter.encode_prompts(PROMPTS)
    assert cached.keys() == live.keys() and all(torch.equal(cached[k], live[k]) for k in live)
    assert all(torch.equal(adapter.null_cond(cached)[k], null[k]) for k in null)
    with pytest.raises(NitroFusionError, match="not among the teacher pairs' cached prompts"):
        adapter.encode_prompts(["a prompt no pair has"])


def test_a_run_without_t5_resident_trains_the_same_student(flux, tmp_path, capsys):
    folder, prompts, _ = flux
    base = ["distill", "--preset", "flux-tiny", "--teacher", str(folder), "--prompts", str(prompts)]
    for cache in ("true", "false"):
        assert main([*base, "--out", str(tmp_path / cache), "--set", f"flux.t5_cache={cache}",
                     "--set", f"pairs.dir={tmp_path / ('pairs-' + cache)}"]) == 0
        assert ("text encoder released" in capsys.readouterr().out) == (cache == "true")
    a, b = (load_file(str(tmp_path / c / "student" / "transformer" / WEIGHTS)) for c in ("true", "false"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_dev_config(flux, tmp_path_factory):
    """The tiny teacher folder with FLUX.1-dev's transformer config.json (12B parameters; its weights not there)."""
    from nitrofusion.worlds.flux.testing import FLUX_DEV

    folder = tmp_path_factory.mktemp("flux-dev") / "teacher"
    shutil.copytree(flux[0], folder)
    config = json.loads((folder / "transformer" / "config.json").read_text()) | FLUX_DEV
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "flux-tiny", "--teacher", "SDXL"], "is an SDXL pipeline (StableDiffusionXLPipeline), but world "
                                                     "'flux' needs a FLUX.1 pipeline (FluxPipeline)"),
    (["--preset", "sd3-tiny", "--teacher", "FLUX"], "is a FLUX.1 pipeline (FluxPipeline), but world 'sd3' needs an "
                                                    "SD3 pipeline (StableDiffusion3Pipeline)"),
    (["--preset", "flux-tiny", "--teacher", "FLUX", "--set", "flux.taps=[0,5]"],
     "flux.taps [5] out of range: a tapped block must be below flux.backbone_blocks (2)"),
    (["--preset", "flux-tiny", "--teacher", "FLUX", "--set", "flux.backbone_blocks=5", "--set", "flux.taps=[4]"],
     "flux.backbone_blocks 5 is more than the teacher's 3 double-stream blocks"),
    (["--preset", "flux-tiny", "--teacher", "DEV"], "a full FLUX student of 11.9B parameters needs"),
    (["--preset", "flux-dev-lora", "--teacher", "DEV", "--set", "student.kind=full"],
     "GiB on one GPU by the memory model (bench --memory --family flux), more than"),
    (["--preset", "flux-tiny", "--teacher", "FLUX", "--set", "flux.sampler.name=ddim"],
     "flux.sampler.name ddim is not built for FLUX"),
])
def test_bad_input_is_one_line_before_weights_load(flux, flux_dev_config, tiny_sdxl, tmp_path, capsys, monkeypatch,
                                                    argv, needle):
    import diffusers

    folder, prompts, _ = flux
    argv = [{"SDXL": str(tiny_sdxl), "FLUX": str(folder), "DEV": str(flux_dev_config)}.get(a, a) for a in argv]

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    for cls in (diffusers.ModelMixin, diffusers.DiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(no_loading))
    assert main(["distill", *argv, "--prompts", str(prompts), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "student").exists()
