"""The guidance knob at one step (docs/method.md §10): w reaches the student UNet as diffusers' `timestep_cond`, a zero
projection leaves the student bitwise unguided at initialisation, pairs store and return each row's w (made by the
teacher at that w), the heads take w, a guided run resumes bitwise, a stock diffusers pipeline reproduces
`generate --guidance W`, and bad input is one line before any model loads."""

from __future__ import annotations

import json

import pytest
import torch

from nitrofusion import config as config_lib
from nitrofusion.cli import main
from nitrofusion.distill_config import DistillConfig
from nitrofusion.errors import ConfigError
from nitrofusion.method import guidance

PROMPTS = ["a photo of a bag", "a photo of a shirt", "a photo of a sneaker"]


def _guided(adapter, scale_range):
    """A copy of `adapter` whose teacher makes each pair at its own w from `scale_range` (what a guided run does)."""
    import dataclasses

    copy = type(adapter).__new__(type(adapter))
    copy.__dict__.update(adapter.__dict__)
    copy.sampler = dataclasses.replace(adapter.sampler, guidance_range=scale_range)
    return copy


def _inputs(adapter, n=3, seed=0):
    x_T = torch.randn((n, *adapter.latent_shape()), generator=torch.Generator().manual_seed(seed))
    return x_T, adapter.encode_prompts(PROMPTS[:n])


def test_w_reaches_the_unet_and_a_zero_projection_is_bitwise_the_unguided_student(tiny_teacher, mini_adapter):
    unet = tiny_teacher.unet
    guided = guidance.add_guidance_input(unet)
    assert guided.config.time_cond_proj_dim == guidance.EMBED_DIM and not guided.time_embedding.cond_proj.weight.any()
    x_T, cond = _inputs(mini_adapter)
    t = torch.full((3,), 999)
    plain = mini_adapter.unet_call(unet, x_T, t, cond)
    seen = []
    guided.time_embedding.cond_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    for w in (1.0, 3.5, torch.tensor([1.0, 2.0, 5.0])):
        assert torch.equal(mini_adapter.unet_call(guided, x_T, t, guidance.with_guidance(cond, w)), plain)
    w = torch.tensor([1.0, 2.0, 5.0])
    assert torch.equal(seen[-1], guidance.scale_embedding(w - 1, guidance.EMBED_DIM))  # timestep_cond, per row
    with torch.no_grad():
        guided.time_embedding.cond_proj.weight.normal_(0, 0.1)
    a = mini_adapter.unet_call(guided, x_T, t, guidance.with_guidance(cond, 1.5))
    b = mini_adapter.unet_call(guided, x_T, t, guidance.with_guidance(cond, 4.0))
    assert not torch.allclose(a, b)
    assert torch.equal(mini_adapter.unet_call(unet, x_T, t, guidance.with_guidance(cond, 4.0)), plain)  # the teacher


def test_pairs_store_each_rows_w_and_the_teacher_made_each_at_it(mini_adapter, tmp_path):
    import dataclasses

    from nitrofusion.data.pairs import PairLoader, generate_pairs, load_pairs, pair_inputs

    plain_sampler = mini_adapter.sampler
    adapter = _guided(mini_adapter, [1.0, 5.0])
    assert "guidance_range=[1.0, 5.0]" in repr(adapter.sampler) and "guidance_range" not in repr(plain_sampler)
    generate_pairs(adapter, PROMPTS, 6, 0, tmp_path, shard_size=3, progress=False)
    pairs = load_pairs(tmp_path)
    streamed = load_pairs(tmp_path, in_memory=False)
    w = pairs.guidance
    assert w.shape == (6,) and ((w >= 1) & (w <= 5)).all() and w.unique().numel() == 6
    rows = torch.tensor([4, 0, 2])
    assert torch.equal(streamed.scales(rows), w[rows])
    loader = PairLoader(pairs, 3, seed=0)
    x_T, x0, prompts, scales = loader.next()
    assert torch.equal(scales, w[loader._perm[:3]])
    # x_T and prompts are those of the same set without w (w is drawn after them)
    plain_inputs = pair_inputs(mini_adapter, PROMPTS, 6, 0, 3)
    assert torch.equal(pairs.x_T, plain_inputs.x_T) and pairs.prompts == plain_inputs.prompts
    # row i is the teacher's sample at its own w: the first shard made again at each row's w as one scalar scale
    x0_rows = []
    for i in range(3):
        spec = dataclasses.replace(plain_sampler, guidance_scale=float(w[i]))
        cond = mini_adapter.encode_prompts(pairs.prompts[:3])
        gen = torch.Generator().manual_seed(0 * 1_000_003 + 0 + 7)
        x0_rows.append(mini_adapter.teacher_sample(pairs.x_T[:3], cond, spec, gen)[i])
    assert torch.equal(torch.stack(x0_rows), pairs.x0[:3])


def test_a_guided_pools_heads_judge_each_row_at_its_w():
    from nitrofusion.method.pool import HeadPool, PoolConfig

    torch.manual_seed(0)
    pool = HeadPool(PoolConfig(heads_per_slot=2, width=8), [16, 16], guided=True)
    feats = [torch.randn(4, 16, 8, 8), torch.randn(4, 16, 4, 4)]
    active = pool.sample_active()
    t_idx = torch.tensor([0, 1, 2, 3]) % len(pool.t_star)
    a = pool.logits(0, active, feats, t_idx, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = pool.logits(0, active, feats, t_idx, torch.tensor([1.0, 2.0, 3.0, 5.0]))
    assert torch.equal(a[:3], b[:3]) and not torch.equal(a[3], b[3])  # a row's logit depends on its own w alone
    with pytest.raises(ValueError, match="pass w"):
        pool.logits(0, active, feats, t_idx)


@pytest.fixture(scope="module")
def guided_student(tiny_teacher, mini_adapter, tmp_path_factory):
    """A guided student folder as `distill` writes it, its guidance projection moved off zero (so w matters)."""
    from nitrofusion.training.loop import save_student

    run = tmp_path_factory.mktemp("guided") / "run"
    torch.manual_seed(3)
    unet = guidance.add_guidance_input(tiny_teacher.unet)
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0, 0.05)
    save_student(run, unet.eval(), _guided(mini_adapter, [1.0, 5.0]), 250)
    return run


def test_a_stock_diffusers_pipeline_reproduces_generate_guidance(guided_student, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from nitrofusion.sampling.scheduler import TimestepShiftLCMScheduler
    from nitrofusion.worlds.mini.adapter import MiniAdapter
    from nitrofusion.worlds.mini.generate import generate_images, load_mini_student

    w = torch.tensor([0.0, 0.5, 2.0, 7.0])  # our embedding of w is the one the pipelines compute
    for dim in (guidance.EMBED_DIM, 33):
        reference = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance.scale_embedding(w, dim), reference)
    folder = guided_student / "student"
    assert json.loads((folder / guidance.GUIDANCE_FILE).read_text()) == {"range": [1.0, 5.0], "default": 2.0}
    # the student folder is the export: a stock pipeline with no text encoder or VAE, fed the prompt states
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False,
                                   unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
                                   scheduler=TimestepShiftLCMScheduler.from_pretrained(folder / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    adapter: MiniAdapter = load_mini_student(guided_student)[0]
    seed = 5
    for steps, w in ((1, 3.0), (4, 1.5)):
        ours = generate_images(guided_student, PROMPTS, steps, seed, guidance=w)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
        x_T = torch.cat([torch.randn((1, *adapter.latent_shape()), generator=g) for g in gens])
        latents = pipe(prompt_embeds=adapter.encode_prompts(PROMPTS)["states"], latents=x_T, generator=gens,
                       num_inference_steps=steps, guidance_scale=w, height=128, width=128,
                       output_type="latent").images
        assert torch.equal(adapter.decode(latents), ours)
    # the CLI writes the same images; without --guidance the student's default
    assert main(["generate", "--model", str(folder), "--prompt", PROMPTS[0], "--guidance", "2",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["generate", "--model", str(folder), "--prompt", PROMPTS[0], "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "0000.png").read_bytes() == (tmp_path / "b" / "0000.png").read_bytes()


def test_the_live_generator_carries_the_guidance_slider(guided_student, few_step_student):
    from nitrofusion.app.live import check_scale, make_generator
    from nitrofusion.errors import NitroFusionError

    run, _ = make_generator(guided_student / "student")
    assert run.guidance == (1.0, 5.0, 2.0)
    assert run("a photo of a bag", 1, 0, guidance=2.0).tobytes() == run("a photo of a bag", 1, 0).tobytes()
    assert run("a photo of a bag", 1, 0, guidance=5.0).tobytes() != run("a photo of a bag", 1, 0).tobytes()
    assert not hasattr(make_generator(few_step_student / "student")[0], "guidance")
    for bad in ("3", None, float("nan"), 0.5, 6.0, True):
        with pytest.raises(NitroFusionError, match="guidance must be a number from 1 to 5"):
            check_scale(bad, 1.0, 5.0)
    assert check_scale(2, 1.0, 5.0) == 2.0


@pytest.fixture(scope="module")
def few_step_student(tiny_teacher, mini_adapter, tmp_path_factory):
    """An unguided student folder."""
    from nitrofusion.training.loop import save_student

    run = tmp_path_factory.mktemp("plain") / "run"
    save_student(run, tiny_teacher.unet, mini_adapter, 250)
    return run


def test_a_tiny_guided_run_trains_the_guidance_input_and_the_heads_take_w(mini_adapter, tiny_cfg, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from nitrofusion.data.pairs import verify_and_repair
    from nitrofusion.training import distill

    adapter = _guided(mini_adapter, [1.0, 3.0])
    pairs = verify_and_repair(adapter, PROMPTS, 8, 0, tmp_path / "pairs", shard_size=8, batch_size=8, progress=False)
    out = tmp_path / "run"
    distill(tiny_cfg("student.guidance=[1,3]"), adapter, pairs, out, progress=False)
    unet = UNet2DConditionModel.from_pretrained(out / "student" / "unet")
    assert unet.config.time_cond_proj_dim == guidance.EMBED_DIM
    assert unet.time_embedding.cond_proj.weight.abs().sum() > 0  # trained off its zero start
    assert json.loads((out / "student" / guidance.GUIDANCE_FILE).read_text())["range"] == [1.0, 3.0]
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    heads = load_file(str(next(ckpt.glob("pool*.safetensors"))))
    assert any(k.endswith("guidance.weight") for k in heads)
    # stopped half way and resumed: bitwise the straight run (the projection's optimiser group included)
    half = tmp_path / "half"
    distill(tiny_cfg("student.guidance=[1,3]", "max_images=8"), adapter, pairs, half, progress=False)
    distill(tiny_cfg("student.guidance=[1,3]"), adapter, pairs, half, resume=True, progress=False)
    name = "student/unet/diffusion_pytorch_model.safetensors"
    straight, resumed = load_file(str(out / name)), load_file(str(half / name))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("overrides, match", [
    (["student.guidance=[5,1]"], "student.guidance: give \\[w_min, w_max\\]"),
    (["student.guidance=[0,2]"], "student.guidance"),
    (["student.guidance=[1,2,3]"], "student.guidance: give"),
    (["student.guidance=[1,5]", "student.kind=lora"], "student.guidance needs student.kind=full"),
    (["student.guidance=[1,5]", "real.source=mix"], "student.guidance needs every row to be a teacher pair"),
])
def test_bad_guidance_configs_are_one_line_before_any_model_loads(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.build(DistillConfig, "distill", "tiny", overrides)


def test_a_family_that_cannot_take_guidance_refuses_it():
    with pytest.raises(ConfigError, match="student.guidance .* world 'mini' only; world 'sd3'"):
        config_lib.build(DistillConfig, "distill", "sd3-tiny", ["student.guidance=[1,5]"])


def test_bad_guidance_flags_exit_2_in_one_line(few_step_student, tmp_path, capsys):
    for flag in ("0", "-1", "nan", "101"):
        assert main(["generate", "--model", str(few_step_student / "student"), "--prompt", "x", "--guidance", flag,
                     "--out", str(tmp_path / "o")]) == 2
        assert "--guidance must be in (0, 100]" in capsys.readouterr().err
    assert main(["generate", "--model", str(few_step_student / "student"), "--prompt", "a photo of a bag",
                 "--guidance", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "was trained without student.guidance" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_evaluate_at_a_guidance_scale(guided_student, few_step_student, tmp_path, capsys):
    argv = ["evaluate", "--samples", "20", "--guidance", "3"]
    assert main([*argv, "--model", "teacher", "--out", str(tmp_path / "t")]) == 0
    teacher = json.loads((tmp_path / "t" / "results.json").read_text())
    assert teacher["guidance"] == 3.0 and teacher["rows"][0]["sampler"] == "dpmsolver++ 8 steps, CFG 3"
    assert main([*argv, "--model", str(guided_student / "student"), "--steps", "1", "--out", str(tmp_path / "s")]) == 0
    student = json.loads((tmp_path / "s" / "results.json").read_text())
    assert student["guidance"] == 3.0 and student["rows"][0]["fid_to_teacher"] >= 0
    assert "student 1 step(s) at guidance 3: classifier-FID" in capsys.readouterr().out
    assert main([*argv, "--model", str(few_step_student / "student"), "--out", str(tmp_path / "u")]) == 2
    assert "was trained without student.guidance" in capsys.readouterr().err


def test_the_guidance_projection_trains_at_its_own_learning_rate(tiny_teacher, tiny_cfg):
    from nitrofusion.training.build import student_param_groups
    from nitrofusion.training.optim import adamw, set_learning_rates

    cfg = tiny_cfg("student.guidance=[1,5]", "student.guidance_lr_scale=10", "student_optim.schedule=linear")
    student = guidance.add_guidance_input(tiny_teacher.unet).requires_grad_(True)
    groups = student_param_groups(student, cfg)
    assert [len(g["params"]) for g in groups] == [len(list(student.parameters())) - 1, 1]
    assert groups[1]["params"][0] is student.time_embedding.cond_proj.weight
    opt = adamw(groups, cfg.student_optim)
    lr = cfg.student_optim.lr
    assert [g["lr"] for g in opt.param_groups] == [lr, 10 * lr]
    set_learning_rates([(opt, cfg.student_optim)], cfg.max_images // 2, cfg.max_images)
    assert [g["lr"] for g in opt.param_groups] == [lr / 2, 10 * lr / 2]
    plain = tiny_cfg()
    assert len(student_param_groups(tiny_teacher.unet, plain)) == 1  # an unguided run keeps its one group


def test_a_w_outside_the_trained_range_is_one_warning(guided_student, tmp_path, capsys):
    assert main(["generate", "--model", str(guided_student / "student"), "--prompt", "a photo of a bag",
                 "--guidance", "8", "--out", str(tmp_path / "o")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "nitrofusion" in line]
    assert len(err) == 1 and "outside the range [1, 5]" in err[0]
