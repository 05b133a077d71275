"""The paper's own setting in the mini world (docs/studies/fewstep.md): a `distill` run as a few-step teacher whose
own sampler makes the pairs and whose UNet is the initial student; the overfitting probe (method/probe.py) on a
hand-built case, and probing a run changes none of its numbers; `ablate` on the realism variants end to end."""

from __future__ import annotations

import types

import pytest
import torch

from nitrofusion import config as config_lib
from nitrofusion.distill_config import DistillConfig
from nitrofusion.errors import NitroFusionError
from nitrofusion.sampling.spec import SamplerSpec

SHIFT = 500


@pytest.fixture(scope="module")
def few_step_run(tiny_teacher, mini_adapter, tmp_path_factory):
    """A run folder whose student/ is a (random, tiny) trained student at shift 500: what `distill` leaves."""
    from nitrofusion.training.loop import save_student

    run = tmp_path_factory.mktemp("fewstep") / "run"
    torch.manual_seed(1)
    unet = type(tiny_teacher.unet).from_config(tiny_teacher.unet.config)  # other weights than the teacher's
    save_student(run, unet.eval(), mini_adapter, SHIFT)
    return run


def test_a_run_is_a_few_step_teacher_whose_sampler_is_the_students_own(few_step_run):
    from nitrofusion.sampling.student import generate
    from nitrofusion.worlds.mini.adapter import MiniAdapter
    from nitrofusion.worlds.mini.teacher import load_teacher

    for path in (few_step_run, few_step_run / "student"):
        teacher = load_teacher(path)
        assert teacher.sampler == SamplerSpec(name="student", steps=4, guidance_scale=0.0, shift=SHIFT)
    adapter = MiniAdapter(teacher)
    cond = adapter.encode_prompts(["a photo of a bag", "a photo of a shirt"])
    x_T = torch.randn((2, *adapter.latent_shape()), generator=torch.Generator().manual_seed(0))
    pairs_x0 = adapter.teacher_sample(x_T, cond, generator=torch.Generator().manual_seed(7))
    student_x0 = generate(adapter, teacher.unet, x_T, cond, 4, SHIFT, generator=torch.Generator().manual_seed(7))
    assert torch.equal(pairs_x0, student_x0)  # the pairs are the student's 4-step samples, bit for bit


def test_a_few_step_teacher_is_the_initial_student_and_its_pairs_have_their_own_cache(few_step_run, tmp_path,
                                                                                      monkeypatch):
    from nitrofusion.data.pair_cache import process_state, training_data
    from nitrofusion.data.pairs import cache_key
    from nitrofusion.training.build import build_parts
    from nitrofusion.worlds import world_of_config

    monkeypatch.setenv("NITROFUSION_CACHE", str(tmp_path / "cache"))
    cfg = config_lib.build(DistillConfig, "distill", "tiny", ["adversarial.regression_weight=0",
                                                              f"teacher={few_step_run}"])
    world = world_of_config(cfg)
    world.check_teacher(cfg)
    adapter = world.adapter(cfg)
    data = training_data(cfg, adapter, world.prompts(cfg), process_state())
    assert len(data) == cfg.pairs.count and torch.isfinite(data.x0).all()
    from accelerate import Accelerator

    student = build_parts(cfg, adapter, Accelerator(cpu=True)).student
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                 adapter.teacher_unet.state_dict().values(), strict=True))
    shipped = config_lib.build(DistillConfig, "distill", "tiny", [])
    multi_step = world_of_config(shipped).adapter(shipped)
    prompts = world.prompts(cfg)
    assert cache_key(adapter, prompts, 16, 0, 8) != cache_key(multi_step, prompts, 16, 0, 8)


def test_sampler_specs_keep_their_cache_keys_and_the_student_sampler_is_checked():
    # the pair cache keys on repr(spec): a spec of the earlier kinds must print as it did before `shift` existed
    assert repr(SamplerSpec()) == ("SamplerSpec(name='dpmsolver++', steps=8, guidance_scale=2.0, "
                                   "timestep_spacing='trailing', timesteps=[])")
    assert "shift=250" in repr(SamplerSpec(name="student", steps=4, guidance_scale=0.0, shift=250))
    for bad in ({"steps": 8}, {"guidance_scale": 2.0}, {"timesteps": [999, 499, 249, 0]}):
        with pytest.raises(NitroFusionError, match="sampler student"):
            config_lib.from_dict(SamplerSpec, {"name": "student", "steps": 4, "guidance_scale": 0.0, **bad})
    with pytest.raises(NitroFusionError, match="shift must be"):
        config_lib.from_dict(SamplerSpec, {"name": "student", "shift": 0})
    with pytest.raises(NitroFusionError, match="not implemented for a flow-matching teacher"):
        config_lib.build(DistillConfig, "distill", "sd3-tiny", ["sd3.sampler.name=student", "sd3.sampler.steps=4",
                                                                "sd3.sampler.guidance_scale=0"])


class _MemoryPool:
    """A hand-built discriminator: D = +1 for a sample whose first pixel is positive, else -1, whatever heads are
    active (the static / dynamic choice and the draws are what `head_accuracies` adds)."""

    def __init__(self, dynamic: bool) -> None:
        self.tasks, self.t_star = ["global_cond"], [10, 500]
        self.cfg = types.SimpleNamespace(dynamic=dynamic)
        self.shape = (1, 2, 1, 4)
        self.seen: list[torch.Tensor] = []

    def logits(self, task, active, feats, t_idx, w=None):
        self.seen.append(active)
        return torch.where(feats[0].flatten(1)[:, :1] > 0, 1.0, -1.0)


def _hand_built_step(dynamic: bool):
    adapter = types.SimpleNamespace(backbone_call=lambda backbone, x, t, cond, boxes: [x])
    step = types.SimpleNamespace(pool=_MemoryPool(dynamic), adapter=adapter, backbone=None,
                                 views=lambda task, real, fake, cond, gen: (real, fake, cond, None),
                                 noised=lambda x, t, gen: x)
    return step


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_probe_scores_a_discriminator_that_memorised_its_training_pairs(dynamic):
    from nitrofusion.method.probe import head_accuracies

    def samples(first_pixels: list[float]) -> tuple[torch.Tensor, dict]:
        x = torch.zeros(len(first_pixels), 1, 2, 2)
        x[:, 0, 0, 0] = torch.tensor(first_pixels)
        return x, {}

    step = _hand_built_step(dynamic)
    shares = head_accuracies(step, samples([1, 1, 1, 1]), samples([1, -1, -1, -1]), samples([-1, -1, 1, -1]),
                             draws=3)
    assert shares == {"real_trained_on": 1.0, "real_held_out": 0.25, "fake": 0.75, "overfit_gap": 0.75}
    choices = {tuple(a.flatten().tolist()) for a in step.pool.seen}
    assert choices == {(0, 0)} if not dynamic else len(choices) > 1  # a static pool has one head per slot


@pytest.mark.slow
def test_probing_a_run_changes_none_of_its_numbers(tiny_cfg, mini_adapter, tmp_path):
    from nitrofusion.data.pairs import generate_pairs, load_pairs
    from nitrofusion.training import distill
    from nitrofusion.worlds.mini.data import class_prompts
    from nitrofusion.worlds.mini.evaluation import MiniEvaluation
    from nitrofusion.worlds.mini.metrics import MiniMetrics
    from nitrofusion.worlds.mini.pairsets import held_out_pairs
    from nitrofusion.worlds.mini.probe import OverfittingProbe

    cfg = tiny_cfg("eval_every_images=8", "max_images=16")
    pairs = load_pairs(generate_pairs(mini_adapter, class_prompts(), cfg.pairs.count, cfg.pairs.seed,
                                      tmp_path / "pairs", cfg.pairs.shard_size, cfg.pairs.batch_size, progress=False))
    probe = OverfittingProbe(MiniEvaluation(mini_adapter, held_out_pairs(mini_adapter, 10, progress=False),
                                            MiniMetrics(), cfg.adversarial.shift), pairs, samples=8)
    plain = distill(cfg, mini_adapter, pairs, tmp_path / "plain", progress=False)
    probed = distill(cfg, mini_adapter, pairs, tmp_path / "probed", progress=False, probe=probe)
    a, b = plain["student"].state_dict(), probed["student"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(plain["pool"].state_dict().values(),
                                                 probed["pool"].state_dict().values(), strict=True))
    import json

    logged = [json.loads(line) for line in (tmp_path / "probed" / "log.jsonl").read_text().splitlines()]
    points = [e for e in logged if "probe" in e]
    assert [e["images"] for e in points] == [0, 8, 16]
    for e in points:
        p = e["probe"]
        assert all(0 <= p[k] <= 1 for k in ("real_trained_on", "real_held_out", "fake", "outside_manifold"))
        assert p["overfit_gap"] == pytest.approx(p["real_trained_on"] - p["real_held_out"], abs=1e-3)


def test_ablate_refuses_realism_variants_without_a_few_step_teacher_and_mixed_studies():
    from nitrofusion.studies.variants import ablation_configs

    with pytest.raises(NitroFusionError, match="add --set teacher=RUN"):
        ablation_configs(["realism"], 1, 0, 64, 10, [], [1])
    with pytest.raises(NitroFusionError, match="few-step variants"):
        ablation_configs(["realism", "static"], 1, 0, 64, 10, ["teacher=/x"], [1])
    with pytest.raises(NitroFusionError, match="real.source=teacher"):
        ablation_configs(["real-data"], 1, 0, 64, 10, [], [1], probe_every=32)
    with pytest.raises(NitroFusionError, match="--probe-every >= 0"):
        ablation_configs(["full"], 1, 0, 64, 10, [], [1], probe_every=-1)
    built = ablation_configs(["realism", "realism-static"], 1, 0, 64, 10, ["teacher=/x"], [1], probe_every=32)
    realism, static = built["realism", 0], built["realism-static", 0]
    assert realism.teacher == "/x" and realism.adversarial.regression_weight == 0 and realism.multistep.p == 0
    assert realism.pool.dynamic and not static.pool.dynamic and realism.eval_every_images == 32


@pytest.mark.slow
def test_ablate_fine_tunes_a_few_step_teacher_and_reports_its_initial_scores_and_the_probe(few_step_run, tmp_path,
                                                                                           monkeypatch):
    from nitrofusion.studies.ablate import run_ablation

    monkeypatch.setenv("NITROFUSION_CACHE", str(tmp_path / "cache"))
    sets = [f"teacher={few_step_run}", "pairs.count=32", "pairs.shard_size=32", "micro_batch=8", "pool.width=8",
            "pool.heads_per_slot=2"]
    r = run_ablation(tmp_path / "study", seeds=1, budget_images=16, eval_samples=20, overrides=sets, steps=[1, 4],
                     variants=["realism", "realism-static"], progress=False, log=lambda _: None, probe_every=8)
    assert set(r["init"]) == {"1", "4"} and all(0 <= r["init"][s]["precision"] <= 1 for s in ("1", "4"))
    assert [p["images"] for p in r["probe"]["realism"]] == [0, 8, 16]
    assert r["probe"]["realism"][0]["overfit_gap"]["std"] == 0  # one seed
    text = (tmp_path / "study" / "ablation.md").read_text()
    assert "| initial student (the few-step teacher's UNet" in text and "## The overfitting probe" in text
    assert (tmp_path / "study" / "probe.png").stat().st_size > 0
