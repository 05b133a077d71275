import json

import pytest
import torch
from safetensors.torch import load_file

from nitrofusion.cli import main
from nitrofusion.data.pairs import PairLoader, load_pairs, verify_and_repair
from nitrofusion.training import distill


@pytest.fixture(scope="module")
def tiny_pairs(mini_adapter, tmp_path_factory):
    prompts = ["a photo of a bag", "a photo of a sandal", "a photo of a trouser"]
    out = tmp_path_factory.mktemp("pairs")
    return verify_and_repair(mini_adapter, prompts, 16, 0, out, shard_size=8, batch_size=8, progress=False)


def _weights(run):
    ck = sorted((run / "checkpoints").iterdir())[-1]
    return load_file(str(ck / "student.safetensors")), load_file(str(ck / "pool.safetensors"))


def test_pairs_are_paired_by_x_T_and_cached(mini_adapter, tiny_pairs, tmp_path):
    assert len(tiny_pairs) == 16 and tiny_pairs.x0.shape == tiny_pairs.x_T.shape == (16, 1, 16, 16)
    i = 5
    cond = mini_adapter.encode_prompts([tiny_pairs.prompts[i]])
    again = mini_adapter.teacher_sample(tiny_pairs.x_T[i:i + 1], cond)
    torch.testing.assert_close(again, tiny_pairs.x0[i:i + 1], rtol=1e-4, atol=1e-4)


def test_corrupt_pair_shard_is_detected_and_regenerated(mini_adapter, tmp_path):
    prompts = ["a photo of a bag"]
    first = verify_and_repair(mini_adapter, prompts, 8, 1, tmp_path, shard_size=4, batch_size=4, progress=False)
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="corrupt"):
        load_pairs(tmp_path)
    second = verify_and_repair(mini_adapter, prompts, 8, 1, tmp_path, shard_size=4, batch_size=4, progress=False)
    assert torch.equal(first.x0, second.x0)


def test_loader_order_is_a_function_of_position():
    from nitrofusion.data.pairs import Pairs

    pairs = Pairs(torch.arange(10.0).view(10, 1), torch.zeros(10, 1), [str(i) for i in range(10)])
    a = PairLoader(pairs, 3, seed=0)
    seq = [a.next()[2] for _ in range(7)]
    b = PairLoader(pairs, 3, seed=0)
    [b.next() for _ in range(4)]
    c = PairLoader(pairs, 3, seed=0)
    c.load_state(b.state())
    assert [c.next()[2] for _ in range(3)] == seq[4:]


def test_distill_smoke_writes_a_loadable_student(mini_adapter, tiny_pairs, tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    result = distill(cfg, mini_adapter, tiny_pairs, tmp_path, progress=False)
    assert result["iterations"] == 2 and result["images"] == 16
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]
    for task in ("global_cond", "local_cond", "local_uncond"):
        assert f"{task}/loss_d" in log[0] and f"{task}/d_fake" in log[0]
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "student" / "unet" / "config.json").exists()
    from nitrofusion.worlds.mini.generate import generate_images

    a = generate_images(tmp_path, ["a photo of a bag", "a photo of a coat"], 2, seed=3)
    b = generate_images(tmp_path, ["a photo of a bag", "a photo of a coat"], 2, seed=3)
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)


def test_student_and_pool_change_during_training(mini_adapter, tiny_pairs, tiny_cfg, tmp_path):
    distill(tiny_cfg(), mini_adapter, tiny_pairs, tmp_path, progress=False)
    student, _ = _weights(tmp_path)
    teacher = mini_adapter.teacher_unet.state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)


def test_resume_reaches_the_same_weights(mini_adapter, tiny_pairs, tiny_cfg, tmp_path):
    distill(tiny_cfg("max_images=32"), mini_adapter, tiny_pairs, tmp_path / "straight", progress=False)
    distill(tiny_cfg("max_images=16"), mini_adapter, tiny_pairs, tmp_path / "split", progress=False)
    distill(tiny_cfg("max_images=32"), mini_adapter, tiny_pairs, tmp_path / "split", resume=True, progress=False)
    (s1, p1), (s2, p2) = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert s1.keys() == s2.keys() and p1.keys() == p2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("argv, needle", [
    (["distill", "--out", "X", "--preset", "nope"], "unknown distill preset 'nope'"),
    (["distill", "--out", "X", "--set", "pool.widht=3"], "did you mean 'width'"),
    (["distill", "--out", "X", "--teacher", "/nonexistent/teacher"], "teacher file missing: /nonexistent/teacher"),
    (["generate", "--model", "/nonexistent", "--prompt", "a", "--out", "Y"], "no model in /nonexistent"),
    (["demo", "--set", "micro_batch=-1"], "micro_batch must be >= 1 (got -1)"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_non_finite_losses_skip_steps_then_stop_with_a_checkpoint(mini_adapter, tiny_pairs, tiny_cfg, tmp_path,
                                                                 monkeypatch):
    from nitrofusion.errors import NitroFusionError
    from nitrofusion.method.pool import HeadPool

    logits = HeadPool.logits_many  # every head call goes through it (`logits` is its one-set case)

    def poisoned(self, task, active, feat_sets, t_idx, w=None):  # NaN from the local-conditional heads at t* = 500
        return [torch.where((t_idx == 2)[:, None] & (task == 1), torch.nan, out)
                for out in logits(self, task, active, feat_sets, t_idx, w)]

    monkeypatch.setattr(HeadPool, "logits_many", poisoned)
    before = {k: v.clone() for k, v in mini_adapter.teacher_unet.state_dict().items()}
    with pytest.raises(NitroFusionError, match=r"non-finite loss or gradient \(last: local_cond@t\*=500\)"):
        distill(tiny_cfg("max_images=400"), mini_adapter, tiny_pairs, tmp_path, progress=False)
    student, _ = _weights(tmp_path)
    assert all(torch.equal(student[k], before[k]) for k in before)  # no step was taken
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 10 and all(e["skipped"] and e["nonfinite"] == ["local_cond@t*=500"] for e in log)


def test_intervals_fire_on_the_step_whose_images_cross_a_multiple(mini_adapter, tiny_pairs, tiny_cfg, tmp_path):
    cfg = tiny_cfg("max_images=32", "checkpoint_every_images=12", "keep_checkpoints=10", "log_every_images=16")
    distill(cfg, mini_adapter, tiny_pairs, tmp_path, progress=False)  # 8 images per step: 8, 16, 24, 32
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").iterdir())
    assert steps == [2, 3, 4]  # 16 and 24 cross multiples of 12; the last step is always saved
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4]


def test_distill_logs_the_one_step_curve_in_the_mini_world(tmp_path):
    run = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--out", str(run), "--set", "eval_every_images=8", "--set",
                 "eval_samples=20"]) == 0
    evals = [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "eval" in e]
    assert [e["step"] for e in evals] == [0, 1, 2]  # before training, then each 8 images (8 per step)
    assert all(e["eval"]["fid"] > 0 and 0 <= e["eval"]["accuracy"] <= 1 for e in evals)


def test_an_existing_run_is_never_overwritten(mini_adapter, tiny_pairs, tiny_cfg, tmp_path):
    from nitrofusion.errors import NitroFusionError

    distill(tiny_cfg(), mini_adapter, tiny_pairs, tmp_path, progress=False)
    with pytest.raises(NitroFusionError, match="already holds a run.*--resume"):
        distill(tiny_cfg(), mini_adapter, tiny_pairs, tmp_path, progress=False)


def test_heads_are_sampled_once_per_optimiser_step_not_per_micro_batch(mini_adapter, tiny_pairs, tiny_cfg,
                                                                        tmp_path, monkeypatch):
    from nitrofusion.method.pool import HeadPool
    from nitrofusion.method.step import AdversarialStep

    draws, seen = [], []
    original_sample, original_call = HeadPool.sample_active, AdversarialStep.__call__

    def sample(self):
        draws.append(original_sample(self))
        return draws[-1]

    def call(self, x_T, x0, cond, active, *a, **k):
        seen.append(active)
        return original_call(self, x_T, x0, cond, active, *a, **k)

    monkeypatch.setattr(HeadPool, "sample_active", sample)
    monkeypatch.setattr(AdversarialStep, "__call__", call)
    distill(tiny_cfg("grad_accum=3", "max_images=36"), mini_adapter, tiny_pairs, tmp_path, progress=False)
    assert len(draws) == 3 and len(seen) == 9
    for i, active in enumerate(seen):
        assert active is draws[i // 3]


def test_mini_generate_writes_prompt_chunks_and_seeds_each_image(mini_adapter, tiny_pairs, tiny_cfg, tmp_path,
                                                                 capsys):
    from PIL import Image

    from nitrofusion.worlds.mini.generate import generate_images

    distill(tiny_cfg(), mini_adapter, tiny_pairs, tmp_path / "run", progress=False)
    both = generate_images(tmp_path / "run", ["a photo of a bag", "a photo of a coat"], 2, seed=5)
    alone = generate_images(tmp_path / "run", ["a photo of a coat"], 2, seed=6)
    # image i is seeded seed + i whatever else is in the batch (up to the batch size's float rounding)
    torch.testing.assert_close(both[1], alone[0], rtol=1e-5, atol=1e-5)
    argv = ["generate", "--model", str(tmp_path / "run"), "--prompt", "a red car", "--steps", "2", "--seed", "4",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "wrote 1 image and a grid" in out and "outside the mini world's 10 class prompts" in err
    info = Image.open(tmp_path / "out" / "0000.png").text
    assert info == {"prompt": "a red car", "seed": "4", "steps": "2"} and (tmp_path / "out" / "grid.png").exists()


def test_linear_schedule_falls_to_zero_at_the_budget(mini_adapter, tiny_pairs, tiny_cfg, tmp_path):
    """`schedule: linear` sets lr * (1 - images done / max_images) before each step (both optimisers);
    a function of the images alone, so a resumed run continues the same line."""
    from nitrofusion.training.optim import set_learning_rates

    cfg = tiny_cfg("max_images=32", "student_optim.schedule=linear", "log_every_images=8")
    distill(cfg, mini_adapter, tiny_pairs, tmp_path / "run", progress=False)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    base = cfg.student_optim.lr
    assert lrs == pytest.approx([base, 0.75 * base, 0.5 * base, 0.25 * base])
    g, d = torch.optim.SGD([torch.zeros(1)], lr=1.0), torch.optim.SGD([torch.zeros(1)], lr=1.0)
    set_learning_rates([(g, cfg.student_optim), (d, cfg.heads_optim)], 24, 32)
    assert g.param_groups[0]["lr"] == pytest.approx(0.25 * base)
    assert d.param_groups[0]["lr"] == cfg.heads_optim.lr  # the heads keep the constant default


def test_linear_schedule_needs_an_image_budget(tiny_cfg):
    from nitrofusion.errors import ConfigError

    with pytest.raises(ConfigError, match="heads_optim.schedule linear decays to 0 at max_images"):
        tiny_cfg("max_images=0", "max_minutes=1", "heads_optim.schedule=linear")


@pytest.mark.slow
def test_every_pair_dtype_trains_with_every_allowed_mixed_precision(tiny_teacher, tmp_path, monkeypatch, capsys):
    """docs/architecture.md, precision: pairs.dtype (storage) x mixed_precision (no, bf16), cached and online, each
    trains through `distill` on a CPU to a finite student (float16 pairs under bf16 autocast used to stop at the
    first shard). The tiny random teacher (2 DDIM steps) keeps the pairs cheap."""
    from accelerate.state import AcceleratorState

    from nitrofusion.worlds.mini.teacher import TeacherTrainConfig, save_teacher

    teacher = tmp_path / "teacher"
    save_teacher(tiny_teacher.unet, TeacherTrainConfig(model=tiny_teacher.model, sampler=tiny_teacher.sampler),
                 teacher, {"note": "random tiny teacher for tests"})
    monkeypatch.setenv("NITROFUSION_CACHE", str(tmp_path / "cache"))
    grid = [(storage, mp, "false") for storage in ("float32", "float16", "bfloat16") for mp in ("no", "bf16")]
    for storage, mp, online in grid + [("float16", "bf16", "true")]:
        AcceleratorState._reset_state(reset_partial_state=True)
        out = tmp_path / f"{storage}-{mp}-{online}"
        code = main(["distill", "--preset", "tiny", "--teacher", str(teacher), "--out", str(out),
                     "--set", f"pairs.dtype={storage}",
                     "--set", f"mixed_precision={mp}", "--set", f"pairs.online={online}", "--set", "max_images=8"])
        assert code == 0, (storage, mp, online, capsys.readouterr().err)
        weights = load_file(str(out / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values())
