"""Every shipped real preset runs as a user runs it: through the CLI, on a tiny random pipeline of its family, with
only sizes and budgets overridden (its precision settings, sampler kind and guidance, pool and optimisers as
shipped; the teacher sampler's step count is a budget too): teacher pairs,
a few optimiser steps with checkpoints, `--resume` to a longer budget, every export format of its family, and
1- and 4-step generation. The presets are found by listing them, so a new one cannot skip this."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from nitrofusion import config as config_lib
from nitrofusion.cli import main
from nitrofusion.distill_config import DistillConfig


def _real_presets() -> list[str]:
    """The distill presets of the diffusers families, less the `*-tiny` ones that exist for tests."""
    return [name for name in config_lib.available_presets("distill")
            if config_lib.load_preset("distill", name).get("world", "mini") != "mini" and not name.endswith("tiny")]


# Sizes only: a tiny pipeline's resolution (SD: 16x16 latents, as bf16 attention on a CPU is slow), SD3's and FLUX's
# depth, FLUX's T5 length;
# nothing about precision, sampler, pool or optimisers.
SIZES = {"sdxl": ["sdxl.resolution=64"], "sd": ["sd.resolution=32"],
         "sd3": ["sd3.resolution=64", "sd3.backbone_blocks=4", "sd3.taps=[1,3]"],
         "flux": ["flux.resolution=64", "flux.backbone_blocks=2", "flux.taps=[0,1]", "flux.max_sequence_length=16"]}
# Budgets: 2 optimiser steps of 2 images, a checkpoint after each, teacher pairs in shards of 4 (the 4 rows the
# first 2 steps draw from the preset's 100,000 may fall in up to 4 shards: the test checks the count it sees).
BUDGET = ["max_images=4", "micro_batch=2", "grad_accum=1", "pairs.shard_size=4", "checkpoint_every_images=2"]
PRECISION_KEYS = ("mixed_precision", "pairs.dtype")


def _sampler_budget(world: str, resolved: dict) -> list[str]:
    """2 teacher steps instead of the preset's 8-40 (a 40-step guided bf16 sampler dominates a CPU test's time);
    a sampler on an explicit grid (DMD2's 4 x0-renoise steps) is left as shipped."""
    sampler = resolved[world]["sampler"]
    return [] if sampler["timesteps"] or sampler["steps"] <= 2 else [f"{world}.sampler.steps=2"]


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    """A tiny random pipeline per family (and SD variant), built once for every preset of it: presets only read it."""
    built: dict = {}

    def get(world: str, preset: dict):
        v_prediction = world == "sd" and preset.get("sd", {}).get("resolution", 512) >= 768  # SD 2.x-v: 768 px
        key = (world, v_prediction)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{world}-teacher") / "pipe"
            if world == "sdxl":
                from nitrofusion.worlds.sdxl.testing import build_random_sdxl

                built[key] = build_random_sdxl(folder, "tiny")
            elif world == "sd":
                from nitrofusion.worlds.sd.testing import build_random_sd

                built[key] = build_random_sd(folder, "sd2" if v_prediction else "sd1")
            elif world == "sd3":
                from nitrofusion.worlds.sd3.testing import build_random_sd3

                built[key] = build_random_sd3(folder)
            else:
                from nitrofusion.worlds.flux.testing import build_random_flux

                built[key] = build_random_flux(folder)
        return built[key]

    return get


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_real_presets_are_listed():
    names = _real_presets()
    assert {"sdxl-realism", "sdxl-vibrant", "sdxl-realism-lora", "sdxl-vibrant-lora", "sd15", "sd21",
            "sd35-medium", "sd35-medium-lora", "flux-dev-lora"} <= set(names)
    assert not any(n.endswith("tiny") or n.startswith("mini") for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("name", _real_presets())
def test_preset_runs_as_users_run_it(name, tiny_pipelines, tmp_path, monkeypatch, capsys):
    from accelerate.state import AcceleratorState

    from nitrofusion.worlds import world_named

    monkeypatch.setenv("NITROFUSION_CACHE", str(tmp_path / "cache"))  # this preset's pairs, made here
    resolved = config_lib.to_dict(config_lib.build(DistillConfig, "distill", name, []))
    world = resolved["world"]
    teacher = tiny_pipelines(world, resolved)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dress\na photo of a shoe\nan astronaut riding a horse\n")
    run = tmp_path / "run"
    sets = [a for kv in SIZES[world] + BUDGET + _sampler_budget(world, resolved) for a in ("--set", kv)]

    def cli(*argv: str) -> str:
        AcceleratorState._reset_state(reset_partial_state=True)  # each command is its own process for a user
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert code == 0, f"{argv[0]} exited {code}: {err.strip().splitlines()[-1:]}"
        return out

    out = cli("distill", "--preset", name, "--teacher", str(teacher), "--prompts", str(prompts), "--out", str(run),
              *sets)
    assert "2 steps, 4 images" in out
    made = re.search(r"making (\d+) of the 25,000 shards of pairs.count=100,000", out)  # only what 4 images read
    assert made and 1 <= int(made[1]) <= 4
    trained = _flat(yaml.safe_load((run / "config.yaml").read_text()))
    shipped = _flat(resolved)
    assert {k: trained[k] for k in PRECISION_KEYS} == {k: shipped[k] for k in PRECISION_KEYS}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]

    out = cli("distill", "--resume", "--out", str(run), "--set", "max_images=8")
    made = re.search(r"making (\d+) of the 25,000 shards", out)
    assert "4 steps, 8 images" in out and made and 1 <= int(made[1]) <= 8
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # continued from step 2, not restarted

    formats = world_named(world).export_formats_for(run)
    assert "diffusers" in formats
    for fmt in formats:
        dest = tmp_path / ("student.safetensors" if fmt == "single-file" else fmt)
        rank = ["--rank", "4"] if fmt == "lora" and resolved["student"]["kind"] == "full" else []
        cli("export", str(run), "--format", fmt, "--out", str(dest), *rank)
        assert dest.exists()
    for steps in ("1", "4"):
        out = cli("generate", "--model", str(run), "--prompt", "a red dress", "--steps", steps,
                  "--out", str(tmp_path / f"steps{steps}"))
        assert out.strip().endswith(f"to {tmp_path / f'steps{steps}'}")
        assert (tmp_path / f"steps{steps}" / "grid.png").exists()

