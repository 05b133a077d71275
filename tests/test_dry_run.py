"""`distill --dry-run` / `pairs --dry-run`: every check that needs no training, from configs and file headers only;
the plan; one-line refusals; nothing written."""

import os

import pytest
import yaml

from nitrofusion.cli import main


def _nothing_written(tmp_path, before):
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_mini_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NITROFUSION_CACHE", str(tmp_path / "cache"))
    assert main(["distill", "--preset", "mini", "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "every check passed; nothing was written" in out
    assert "14,720 images = 460 optimiser steps of micro-batch 32 x 1 accumulation x 1 process" in out
    assert "heads: 480 in the pool (3 tasks x 4 t* groups x 10 levels x 4), 120 active per step" in out
    assert "output: " in out and ": new" in out
    assert not any(tmp_path.iterdir())  # no run folder, no cache


def test_the_plan_counts_what_the_run_would_build(tiny_sdxl, sdxl_adapter, prompt_file, tmp_path, capsys):
    """Parameters, E's levels and the LoRA student's trainable parameters from config.json and the weights'
    headers equal the loaded models' (the teacher UNet, the backbone, the LoRA student)."""
    from nitrofusion import config as config_lib
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.training import build_student
    from nitrofusion.worlds import world_named

    cfg = config_lib.build(DistillConfig, "distill", "sdxl-realism-lora",
                           [f"teacher={tiny_sdxl}", "sdxl.resolution=64", "student.rank=4", "mixed_precision=no"])
    plan = world_named("sdxl").plan_model(cfg)
    unet = sdxl_adapter.teacher_unet
    assert plan.parameters == sum(p.numel() for p in unet.parameters())
    assert plan.level_channels == sdxl_adapter.make_backbone().channels
    student = build_student(cfg, sdxl_adapter)
    try:
        assert plan.trainable == sum(p.numel() for p in student.parameters() if p.requires_grad)
    finally:
        from nitrofusion.models.student import remove_lora

        remove_lora(sdxl_adapter.teacher_unet)
    assert plan.peak_bytes and plan.peak_bytes > 0
    argv = ["distill", "--preset", "sdxl-realism-lora", "--teacher", str(tiny_sdxl), "--prompts", str(prompt_file),
            "--out", str(tmp_path / "run"), "--set", "sdxl.resolution=64", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 prompts" in out and "lora" in out and "predicted peak" in out and not (tmp_path / "run").exists()
    assert main(["pairs", "--preset", "sdxl-realism", "--teacher", str(tiny_sdxl), "--prompts", str(prompt_file),
                 "--dry-run"]) == 0
    assert "teacher pairs: 100,000 (float16), 200 shards of 500" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["key", "no-teacher", "other-family", "out-is-a-file", "resume-other-config",
                                  "run-exists"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tiny_sdxl, prompt_file, tmp_path, capsys,
                                                          monkeypatch):
    from nitrofusion.worlds.sd.testing import build_random_sd

    monkeypatch.setenv("NITROFUSION_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    sdxl = ["--preset", "sdxl-realism", "--prompts", str(prompt_file), "--set", "sdxl.resolution=64"]
    argv, needle = {
        "key": (["--preset", "mini", "--set", "pool.heads_per_slott=2"], "did you mean 'heads_per_slot'"),
        "no-teacher": ([*sdxl, "--teacher", str(tmp_path / "nowhere")], "is not a diffusers pipeline"),
        "other-family": ([*sdxl, "--teacher", "SD"], "but world 'sdxl' needs an SDXL pipeline"),
        "out-is-a-file": (["--preset", "mini"], "is a file; choose another --out"),
        "resume-other-config": (["--resume", "--preset", "tiny", "--set", "pool.width=16"],
                                "was trained with another config (pool.width differ)"),
        "run-exists": (["--preset", "tiny"], "already holds a run (checkpoints/)"),
    }[case]
    if case == "other-family":
        argv[argv.index("SD")] = str(build_random_sd(tmp_path / "sd"))
    if case == "out-is-a-file":
        (tmp_path / "file").write_text("x")
        run = tmp_path / "file" / "run"
    if case in ("resume-other-config", "run-exists"):
        from nitrofusion import config as config_lib
        from nitrofusion.distill_config import DistillConfig

        (run / "checkpoints" / "step-00000001").mkdir(parents=True)
        config_lib.save(config_lib.build(DistillConfig, "distill", "tiny"), run / "config.yaml")
    (tmp_path / "cache").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(["distill", *argv, "--out", str(run), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    _nothing_written(tmp_path, before)
    if case in ("resume-other-config",):
        assert yaml.safe_load((run / "config.yaml").read_text())["pool"]["width"] != 16


def test_the_dry_run_sees_the_processes_accelerate_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["distill", "--preset", "mini", "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "x 4 processes = 128 images per step" in capsys.readouterr().out
    assert os.environ["WORLD_SIZE"] == "4"
