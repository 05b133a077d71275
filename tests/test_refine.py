"""The multi-step training stage (method/refine.py): backward simulation follows the released sampler,
the trained call is conditioned on the shifted grid timesteps, and p = 0 is the one-step method."""

import pytest
import torch

from nitrofusion.method.backbone import UNetBackbone
from nitrofusion.method.diffusion import conditioning_timestep
from nitrofusion.method.pool import HeadPool, PoolConfig
from nitrofusion.method.refine import backward_simulate, draw_refinement
from nitrofusion.method.step import AdversarialConfig, AdversarialStep, student_one_step
from nitrofusion.sampling.student import shifted_scheduler
from nitrofusion.training import distill

GRID = [749, 499, 249]


def _inputs(adapter, n=4):
    x_T = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return x_T, adapter.encode_prompts(["a photo of a bag", "a photo of a coat"] * (n // 2))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_backward_simulation_is_the_released_sampler_run_k_steps(mini_adapter, k):
    """k student steps along 999 -> 749 -> 499 -> 249 equal TimestepShiftLCMScheduler's first k steps of
    its 4-step run with the same generator (LCM's c_skip at t' >= 124 is < 2e-7, hence the tolerance)."""
    unet, shift = mini_adapter.teacher_unet, 500
    x_T, cond = _inputs(mini_adapter)
    sched = shifted_scheduler(mini_adapter.scheduler_config, shift)
    sched.set_timesteps(4)
    x, g = x_T, torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in sched.timesteps[:k]:
            x = sched.step(mini_adapter.unet_call(unet, x, t.expand(4), cond), t, x, generator=g).prev_sample
    ks = torch.full((4,), k)
    ours, t_in = backward_simulate(mini_adapter, unet, x_T, cond, ks, GRID, shift, torch.Generator().manual_seed(5))
    assert t_in.tolist() == [GRID[k - 1]] * 4
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_each_sample_stops_at_its_own_step_and_k0_keeps_the_noise(mini_adapter):
    x_T, cond = _inputs(mini_adapter)
    ks = torch.tensor([0, 1, 3, 2])
    x, t = backward_simulate(mini_adapter, mini_adapter.teacher_unet, x_T, cond, ks, GRID, 500,
                             torch.Generator().manual_seed(1))
    assert t.tolist() == [999, 749, 249, 499]
    assert torch.equal(x[0], x_T[0]) and not torch.equal(x[1], x_T[1])


def test_draw_refinement_shares():
    k = draw_refinement(20000, 0.25, 3, torch.Generator().manual_seed(0))
    assert abs((k > 0).float().mean().item() - 0.25) < 0.02
    assert set(k.tolist()) == {0, 1, 2, 3}
    assert draw_refinement(50, 0.0, 3, torch.Generator()).eq(0).all()


def _step(adapter, student, shift=500):
    backbone = UNetBackbone(adapter.teacher_unet)
    pool = HeadPool(PoolConfig(width=8, heads_per_slot=1), backbone.channels)
    return AdversarialStep(adapter, student, backbone, pool, AdversarialConfig(shift=shift)), pool


def test_the_trained_call_is_conditioned_on_the_shifted_grid_timestep(mini_adapter):
    import copy

    student = copy.deepcopy(mini_adapter.teacher_unet).requires_grad_(True)
    seen = []
    student.register_forward_pre_hook(lambda m, args: seen.append((args[1].clone(), torch.is_grad_enabled())))
    step, _ = _step(mini_adapter, student)
    x_T, cond = _inputs(mini_adapter, 8)
    x0, t_in = step.fake_x0(x_T, cond, 1.0, torch.Generator().manual_seed(2))
    assert x0.shape == x_T.shape and x0.requires_grad
    assert set(t_in.tolist()) <= set(GRID) and len(set(t_in.tolist())) > 1
    simulated, trained = seen[:-1], seen[-1]
    assert all(not grad for _, grad in simulated) and trained[1]  # only the last call builds a graph
    assert torch.equal(trained[0], conditioning_timestep(t_in, 500))  # 749 -> 374, 499 -> 249, 249 -> 124
    assert set(conditioning_timestep(torch.tensor(GRID), 500).tolist()) == {374, 249, 124}
    assert simulated[0][0].eq(499).all()  # every simulation starts with the one-step call at t' = 499


def test_p_zero_is_the_one_step_sample_and_draws_nothing(mini_adapter):
    step, _ = _step(mini_adapter, mini_adapter.teacher_unet)
    x_T, cond = _inputs(mini_adapter)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    x0, t_in = step.fake_x0(x_T, cond, 0.0, gen)
    assert t_in is None and torch.equal(gen.get_state(), state)
    assert torch.equal(x0, student_one_step(mini_adapter, mini_adapter.teacher_unet, x_T, cond, 500))


def _student(run):
    from safetensors.torch import load_file

    return load_file(str(run / "student" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_stage_start_and_p(mini_adapter, tiny_cfg, tmp_path):
    """Before `start_images` the run is the one-step method bit for bit; with p > 0 it is not."""
    from nitrofusion.data.pairs import verify_and_repair

    pairs = verify_and_repair(mini_adapter, ["a photo of a bag", "a photo of a coat"], 16, 0, tmp_path / "pairs",
                              shard_size=8, batch_size=8, progress=False)
    distill(tiny_cfg("multistep.p=0"), mini_adapter, pairs, tmp_path / "one", progress=False)
    distill(tiny_cfg("multistep.p=0.5", "multistep.start_images=16"), mini_adapter, pairs, tmp_path / "late",
            progress=False)
    distill(tiny_cfg("multistep.p=0.5"), mini_adapter, pairs, tmp_path / "ms", progress=False)
    one, late, ms = (_student(tmp_path / n) for n in ("one", "late", "ms"))
    assert all(torch.equal(one[k], late[k]) for k in one)
    assert any(not torch.equal(one[k], ms[k]) for k in one)
    import json

    log = [json.loads(x) for x in (tmp_path / "ms" / "log.jsonl").read_text().splitlines()]
    assert all(0 <= e["refine_share"] <= 1 for e in log)


def test_refinement_regression_stops_at_its_image_count(mini_adapter, tiny_cfg, tmp_path, monkeypatch):
    """regression_refine_until=8: the first optimiser step (images 0-7) gives refinement rows the regression,
    the later ones do not; the switch follows the images done, as the learning rate does."""
    from nitrofusion.data.pairs import verify_and_repair
    from nitrofusion.method.schedules import refine_probability, regression_on_refinements
    from nitrofusion.training import step

    calls, real_schedule = [], step.regression_on_refinements

    def spy(*args, **kwargs):  # the optimiser step reads the schedule once, at its images done
        calls.append(real_schedule(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(step, "regression_on_refinements", spy)
    pairs = verify_and_repair(mini_adapter, ["a photo of a bag", "a photo of a coat"], 16, 0, tmp_path / "pairs",
                              shard_size=8, batch_size=8, progress=False)
    cfg = tiny_cfg("multistep.p=0.5", "adversarial.regression_weight=1", "adversarial.regression_rows=all",
                   "adversarial.regression_refine_until=8", "max_images=24")
    distill(cfg, mini_adapter, pairs, tmp_path / "run", progress=False)
    assert calls == [True, False, False]
    # the schedules are pure functions of (config, images seen)
    assert [regression_on_refinements(cfg.adversarial, n) for n in (0, 7, 8, 100)] == [True, True, False, False]
    stage = tiny_cfg("multistep.p=0.5", "multistep.start_images=16").multistep
    assert [refine_probability(stage, n) for n in (0, 15, 16)] == [0.0, 0.0, 0.5]


def test_shifted_renoising_diagnostic_is_consistent_in_noise_level(mini_adapter):
    """renoise='shifted' re-noises to the next SHIFTED timestep (2 steps at s=500: 499 then 249)."""
    from nitrofusion.method.diffusion import add_noise, x0_from_output
    from nitrofusion.sampling.student import generate

    unet, ab = mini_adapter.teacher_unet, mini_adapter.alphas_cumprod
    x_T, cond = _inputs(mini_adapter)
    ours = generate(mini_adapter, unet, x_T, cond, 2, 500, torch.Generator().manual_seed(4), renoise="shifted")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        x0 = x0_from_output(mini_adapter.unet_call(unet, x_T, torch.full((4,), 499), cond), x_T, ab[[499] * 4],
                            "epsilon")
        x = add_noise(x0, torch.randn(x_T.shape, generator=g), ab[[249] * 4])
        ref = x0_from_output(mini_adapter.unet_call(unet, x, torch.full((4,), 249), cond), x, ab[[249] * 4], "epsilon")
    torch.testing.assert_close(ours, ref)


def test_extra_mode_adds_refinement_rows_to_every_one_step_row(mini_adapter):
    """mode=extra: the micro-batch keeps all its one-step rows and appends, for the refining pairs, a refinement
    step from the same x_T judged against the same real sample."""
    import copy

    from nitrofusion.method.config import MultiStepConfig

    student = copy.deepcopy(mini_adapter.teacher_unet).requires_grad_(True)
    backbone = UNetBackbone(mini_adapter.teacher_unet)
    pool = HeadPool(PoolConfig(width=8, heads_per_slot=1), backbone.channels)
    step = AdversarialStep(mini_adapter, student, backbone, pool, AdversarialConfig(shift=500),
                           MultiStepConfig(p=0.5, mode="extra"))
    seen = []
    backbone_forward = backbone.forward
    backbone.forward = lambda x, *a, **k: seen.append(x.shape[0]) or backbone_forward(x, *a, **k)
    x_T, cond = _inputs(mini_adapter, 8)
    logs = step(x_T, torch.zeros_like(x_T), cond, pool.sample_active(), torch.Generator().manual_seed(0),
                refine_p=0.5)
    extra = seen[0] - 8
    # every view has the enlarged batch: E's calls are the global task's (real, fake) and then the two crop
    # tasks' together (real, fake: twice the rows)
    assert 0 < extra <= 8 and seen == [8 + extra] * 2 + [2 * (8 + extra)] * 2
    assert logs["refine_share"] == pytest.approx(extra / (8 + extra))
