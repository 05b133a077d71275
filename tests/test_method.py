import pytest
import torch
from diffusers import UNet2DConditionModel

from nitrofusion.method.backbone import UNetBackbone, level_channels
from nitrofusion.method.losses import d_loss, g_loss, regression_loss
from nitrofusion.method.pool import TASKS, HeadPool, PoolConfig
from nitrofusion.method.step import AdversarialConfig, AdversarialStep, student_one_step


def _pool(**kw):
    return HeadPool(PoolConfig(**{"width": 8, **kw}), level_channels=[16, 16, 16, 16, 16, 16, 32, 32, 32, 32])


def test_backbone_levels_match_sdxl_layout(tiny_teacher):
    unet = tiny_teacher.unet
    bb = UNetBackbone(unet)
    assert bb.num_levels == 10
    cond = torch.randn(2, 16, 384)
    feats = bb(torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), cond)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (16, 16, 16), (16, 16, 16), (16, 16, 16), (16, 8, 8), (16, 8, 8), (16, 8, 8), (16, 4, 4),
        (32, 4, 4), (32, 4, 4), (32, 4, 4)]
    assert [f.shape[1] for f in feats] == bb.channels


def test_backbone_equals_the_unets_own_down_path(tiny_teacher):
    """Features are exactly what UNet2DConditionModel.forward computes (checked through a hook)."""
    unet = tiny_teacher.unet
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([250, 750]), torch.randn(2, 16, 384)
    seen = {}
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        unet(x, t, c)
        feats = UNetBackbone(unet)(x, t, c)
    handle.remove()
    torch.testing.assert_close(feats[-1], seen["mid"])


def test_backbone_level_count_for_other_layouts():
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)
    feats = UNetBackbone(unet)(torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 2, 8))
    assert len(feats) == len(level_channels(unet)) == 1 + 2 + 1 + 1


def test_pool_shape_and_sampling_covers_every_slot():
    pool = _pool()
    assert len(pool.heads) == 3 * 4 * 10 * 4 == 480
    seen = torch.zeros(3, 4, 10, 4, dtype=torch.bool)
    for _ in range(60):
        active = pool.sample_active()
        assert active.shape == (3, 4, 10)  # exactly one head per (task, t*, level) slot
        seen.scatter_(3, active.unsqueeze(-1), True)
    assert seen.all()
    assert len(set(pool.active_indices(pool.sample_active()))) == 120


def test_static_pool_always_uses_the_same_heads():
    pool = _pool(dynamic=False)
    assert len(pool.heads) == 120
    assert all(pool.sample_active().eq(0).all() for _ in range(5))


def test_pool_sampling_is_identical_for_the_same_seed():
    a, b = _pool(seed=3), _pool(seed=3)
    assert all(torch.equal(a.sample_active(), b.sample_active()) for _ in range(5))
    assert a.refresh() == b.refresh()


def test_refresh_reinitialises_exactly_the_chosen_heads_and_their_optimiser_state():
    pool = _pool(refresh_fraction=0.01)
    opt = torch.optim.AdamW(pool.parameters(), lr=1e-3)
    for p in pool.parameters():  # give every head optimiser state
        p.grad = torch.ones_like(p)
    opt.step()
    before = [[p.detach().clone() for p in h.parameters()] for h in pool.heads]
    chosen = pool.refresh(opt)
    assert len(chosen) == 5  # round(1% of 480)
    for i, head in enumerate(pool.heads):
        same = all(torch.equal(a, b) for a, b in zip(before[i], head.parameters(), strict=True))
        has_state = all(p in opt.state for p in head.parameters())
        if i in chosen:
            assert not same and not has_state
        else:
            assert same and has_state
    assert pool.refresh(None) != chosen  # a fresh draw each step
    assert _pool(refresh_fraction=0.0).refresh(opt) == []


def test_losses_on_known_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert d_loss(real, fake, "hinge").item() == pytest.approx((0 + 0.5) / 2 + (0 + 1.5) / 2)
    assert d_loss(real, fake, "linear").item() == pytest.approx(-0.75 - 1.25)
    sp = torch.nn.functional.softplus
    assert d_loss(real, fake, "nonsat").item() == pytest.approx((sp(-real).mean() + sp(fake).mean()).item())
    assert g_loss(fake, "hinge").item() == pytest.approx(0.75)
    assert g_loss(fake, "linear").item() == pytest.approx(0.75)
    assert g_loss(fake, "nonsat").item() == pytest.approx(sp(-fake).mean().item())
    with pytest.raises(ValueError):
        d_loss(real, fake, "wgan-gp")


@pytest.fixture()
def step_parts(tiny_teacher, mini_adapter):
    import copy

    torch.manual_seed(0)
    student = copy.deepcopy(tiny_teacher.unet).requires_grad_(True)
    backbone = UNetBackbone(tiny_teacher.unet)
    pool = HeadPool(PoolConfig(width=8, heads_per_slot=2), backbone.channels)
    step = AdversarialStep(mini_adapter, student, backbone, pool,
                           AdversarialConfig(shift=250, loss="linear"))  # linear: never saturates
    x_T = torch.randn(8, 1, 16, 16)
    x0 = torch.randn(8, 1, 16, 16).clamp(-1, 1)
    cond = mini_adapter.encode_prompts(["a photo of a dress"] * 8)
    return step, student, pool, x_T, x0, cond


@pytest.mark.parametrize("aggregate", ["sum", "per_head"])
def test_only_active_heads_and_the_student_get_gradients(step_parts, aggregate):
    step, student, pool, x_T, x0, cond = step_parts
    step.cfg.aggregate = aggregate
    active = pool.sample_active()
    logs = step(x_T, x0, cond, active, torch.Generator().manual_seed(0))
    act = set(pool.active_indices(active))
    for i, head in enumerate(pool.heads):
        grads = [p.grad for p in head.parameters()]
        if i in act:
            # (the last bias may get exactly zero under the linear loss: equal real and fake counts)
            assert all(g is not None for g in grads) and grads[0].abs().sum() > 0, i
        else:
            assert all(g is None for g in grads), i
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in step.backbone.parameters())  # E is frozen
    assert {f"{t}/loss_d" for t in TASKS} <= logs.keys()


def test_d_step_moves_only_active_heads_and_g_step_only_the_student(step_parts):
    step, student, pool, x_T, x0, cond = step_parts
    active = pool.sample_active()
    opt_d = torch.optim.AdamW(pool.parameters(), lr=1e-2)
    heads0 = [[p.detach().clone() for p in h.parameters()] for h in pool.heads]
    student0 = [p.detach().clone() for p in student.parameters()]
    step(x_T, x0, cond, active, torch.Generator().manual_seed(0), train_g=False)
    assert all(p.grad is None for p in student.parameters())
    opt_d.step()
    moved = {i for i, h in enumerate(pool.heads)
             if any(not torch.equal(a, b) for a, b in zip(heads0[i], h.parameters(), strict=True))}
    assert moved == set(pool.active_indices(active))
    assert all(torch.equal(a, b) for a, b in zip(student0, student.parameters(), strict=True))

    opt_d.zero_grad(set_to_none=True)
    opt_g = torch.optim.AdamW(student.parameters(), lr=1e-3)
    heads1 = [p.detach().clone() for p in pool.parameters()]
    step(x_T, x0, cond, active, torch.Generator().manual_seed(0), train_d=False)
    assert all(p.grad is None for p in pool.parameters())
    opt_g.step()
    assert all(torch.equal(a, b) for a, b in zip(heads1, pool.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(student0, student.parameters(), strict=True))


def test_local_tasks_see_crops_and_unconditional_sees_null(step_parts, monkeypatch):
    step, student, pool, x_T, x0, cond = step_parts
    calls = []
    real_call = step.adapter.backbone_call

    def spy(backbone, x, t, c, boxes):
        null = [bool(part.abs().sum() == 0) for part in c["states"].split(x_T.shape[0])]
        calls.append((tuple(x.shape), null, boxes is None))
        return real_call(backbone, x, t, c, boxes)

    monkeypatch.setattr(step.adapter, "backbone_call", spy)
    step(x_T, x0, cond, pool.sample_active(), torch.Generator().manual_seed(0))
    # real (no grad) then fake: the global task full size with the prompt; the two crop tasks in one call,
    # half size, local_cond's rows with the prompt and then local_uncond's with the null prompt
    assert calls == [((8, 1, 16, 16), [False], True)] * 2 + [((16, 1, 8, 8), [False, True], False)] * 2


def test_single_head_baseline_pool_has_one_head_on_the_mid_block():
    pool = _pool(tasks=["global_cond"], levels=[-1], group_by_t_star=False, dynamic=False, refresh_fraction=0.0)
    assert len(pool.heads) == 1 and pool.levels == [9]
    feats = [torch.randn(6, c, 8, 8) for c in [16, 16, 16, 16, 16, 16, 32, 32, 32, 32]]
    t_idx = torch.tensor([0, 1, 2, 3, 0, 1])
    logits = pool.logits(0, pool.sample_active(), feats, t_idx)
    assert logits.shape == (6, 1)
    assert torch.allclose(logits[:, 0], pool.heads[0](feats[9]))  # the same head for every t*
    with pytest.raises(Exception, match="feature levels"):
        _pool(levels=[10])


def _student_grads(step, student, pool, x_T, x0, cond, active, **kw):
    student.zero_grad(set_to_none=True)
    pool.zero_grad(set_to_none=True)
    logs = step(x_T, x0, cond, active, torch.Generator().manual_seed(0), train_d=False, **kw)
    return [p.grad.clone() for p in student.parameters()], logs


@pytest.mark.parametrize("loss,aggregate", [("hinge", "sum"), ("linear", "per_head"), ("nonsat", "per_head")])
def test_task_by_task_generator_backward_equals_one_backward(step_parts, loss, aggregate):
    """The memory-saving path (each task's backbone graph freed after its own backward) is exact."""
    step, student, pool, x_T, x0, cond = step_parts
    step.cfg.loss, step.cfg.aggregate = loss, aggregate
    active = pool.sample_active()
    grads = []
    for separable in (True, False):
        step._separable = lambda s=separable: s
        g, logs = _student_grads(step, student, pool, x_T, x0, cond, active)
        grads.append((g, logs["loss_g"]))
    (a, la), (b, lb) = grads
    assert la == pytest.approx(lb, rel=1e-5)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("separable", [True, False])
def test_regression_adds_its_weighted_mse_gradient_to_the_students(step_parts, separable):
    """L_G + lambda * MSE(G(x_T), T(x_T)): the student's gradient is the adversarial one plus lambda times
    the regression's own, on both generator paths (task by task, and all tasks in one backward)."""
    step, student, pool, x_T, x0, cond = step_parts
    step._separable = lambda: separable
    active = pool.sample_active()
    adv, logs_off = _student_grads(step, student, pool, x_T, x0, cond, active)
    step.cfg.regression_weight = 3.0
    both, logs_on = _student_grads(step, student, pool, x_T, x0, cond, active)
    student.zero_grad(set_to_none=True)
    reg = regression_loss(student_one_step(step.adapter, student, x_T, cond, step.cfg.shift), x0)
    reg.backward()
    assert "regression" not in logs_off and logs_on["regression"] == pytest.approx(reg.item(), rel=1e-6)
    assert logs_on["loss_g"] == pytest.approx(logs_off["loss_g"], rel=1e-6)  # adversarial part unchanged
    for a, b, r in zip(adv, both, student.parameters(), strict=True):
        assert torch.allclose(b, a + 3.0 * r.grad, rtol=1e-4, atol=1e-6)


def test_regression_skips_refinement_rows(step_parts):
    """A refinement step starts from the student's own re-noised sample, so the pair's x0 is not its target:
    with every row refining, the term is absent and the gradient is the adversarial one alone."""
    step, student, pool, x_T, x0, cond = step_parts
    active = pool.sample_active()
    adv, _ = _student_grads(step, student, pool, x_T, x0, cond, active, refine_p=1.0)
    step.cfg.regression_weight = 3.0
    same, logs = _student_grads(step, student, pool, x_T, x0, cond, active, refine_p=1.0)
    assert "regression" not in logs
    assert all(torch.equal(a, b) for a, b in zip(adv, same, strict=True))


def test_regression_on_all_rows_reaches_refinement_rows(step_parts):
    """regression_rows "all" [ours]: refinement rows are pulled toward the teacher's x0 of their x_T too. With
    every row refining, the term appears and moves the gradient; with none refining, "all" equals "one_step" bit
    for bit (the same rows)."""
    step, student, pool, x_T, x0, cond = step_parts
    active = pool.sample_active()
    step.cfg.regression_weight = 3.0
    adv, _ = _student_grads(step, student, pool, x_T, x0, cond, active, refine_p=1.0)  # one_step: no term
    step.cfg.regression_rows = "all"
    pulled, logs = _student_grads(step, student, pool, x_T, x0, cond, active, refine_p=1.0)
    assert logs["regression"] > 0 and not all(torch.equal(a, b) for a, b in zip(adv, pulled, strict=True))
    every, _ = _student_grads(step, student, pool, x_T, x0, cond, active)
    step.cfg.regression_rows = "one_step"
    one, _ = _student_grads(step, student, pool, x_T, x0, cond, active)
    assert all(torch.equal(a, b) for a, b in zip(every, one, strict=True))


def test_refinement_regression_switched_off_is_the_one_step_rows_only(step_parts):
    """Past regression_refine_until the loop calls the step with refine_regression=False: "all" then gives no
    refinement row the term, exactly as "one_step" does."""
    step, student, pool, x_T, x0, cond = step_parts
    active = pool.sample_active()
    step.cfg.regression_weight = 3.0
    one, _ = _student_grads(step, student, pool, x_T, x0, cond, active, refine_p=1.0)
    step.cfg.regression_rows = "all"
    off, logs = _student_grads(step, student, pool, x_T, x0, cond, active, refine_p=1.0, refine_regression=False)
    assert "regression" not in logs
    assert all(torch.equal(a, b) for a, b in zip(one, off, strict=True))


def test_logits_of_several_feature_sets_in_one_call_equal_one_call_per_set():
    torch.manual_seed(0)
    pool = _pool(heads_per_slot=2)
    active = pool.sample_active()
    t_idx = torch.tensor([0, 1, 2, 3, 0, 1, 2])  # 7 samples: uneven groups
    sizes = [16, 8, 8, 8, 4, 4, 4, 2, 2, 2]

    def feats():
        return [torch.randn(7, c, s, s) for c, s in zip(pool_channels(), sizes, strict=True)]

    real, fake = feats(), feats()
    for task in range(len(pool.tasks)):
        both = pool.logits_many(task, active, [real, fake], t_idx)
        for got, f in zip(both, (real, fake), strict=True):
            torch.testing.assert_close(got, pool.logits(task, active, f, t_idx), rtol=1e-5, atol=1e-6)


def pool_channels():
    return [16, 16, 16, 16, 16, 16, 32, 32, 32, 32]


def test_crop_tasks_in_one_backbone_call_equal_one_call_per_task(step_parts):
    """task_groups batches the two crop tasks through E; per-task calls (the reference) give the same
    losses, student gradients and head gradients from the same random draws."""
    step, student, pool, x_T, x0, cond = step_parts
    assert step.task_groups() == [[0], [1, 2]]
    active = pool.sample_active()
    results = []
    for groups in (step.task_groups(), [[0], [1], [2]]):
        step.task_groups = lambda g=groups: g
        student.zero_grad(set_to_none=True)
        pool.zero_grad(set_to_none=True)
        logs = step(x_T, x0, cond, active, torch.Generator().manual_seed(0))
        heads = [p.grad.clone() for p in pool.parameters() if p.grad is not None]
        results.append((logs, [p.grad.clone() for p in student.parameters()], heads))
    (la, ga, ha), (lb, gb, hb) = results
    assert la.keys() == lb.keys() and all(la[k] == pytest.approx(lb[k], rel=1e-5, abs=1e-6) for k in la)
    assert len(ha) == len(hb) > 0
    for x, y in zip([*ga, *ha], [*gb, *hb], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
