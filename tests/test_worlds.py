"""The world registry: a run's config or a model path picks its world; commands dispatch through it, and a
world refuses the options that do not apply to its models in one line."""

import pytest

from nitrofusion.cli import main
from nitrofusion.data.pairs import verify_and_repair
from nitrofusion.errors import NitroFusionError
from nitrofusion.training import distill
from nitrofusion.worlds import GenerateOptions, registered, world_named, world_of_config, world_of_model


@pytest.fixture(scope="module")
def mini_run(mini_adapter, tmp_path_factory):
    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig

    root = tmp_path_factory.mktemp("world")
    pairs = verify_and_repair(mini_adapter, ["a photo of a bag", "a photo of a coat"], 16, 0, root / "pairs",
                              shard_size=8, batch_size=8, progress=False)
    distill(config.build(DistillConfig, "distill", "tiny", []), mini_adapter, pairs, root / "run", progress=False)
    return root / "run"


def test_registry_names_every_world_and_refuses_others(tiny_cfg):
    assert list(registered()) == ["mini", "sdxl", "sd", "sd3", "flux"] and world_of_config(tiny_cfg()).name == "mini"
    with pytest.raises(NitroFusionError, match="unknown world 'pixart': choose mini, sdxl, sd, sd3, flux"):
        world_named("pixart")


def test_a_model_path_picks_its_world(mini_run, tiny_sdxl, tmp_path):
    from nitrofusion.worlds.sd.testing import build_random_sd

    sd = build_random_sd(tmp_path / "sd", "sd1")
    assert world_of_model(sd).name == "sd" and world_of_model(sd / "unet").name == "sd"
    assert world_of_model(mini_run).name == "mini"  # a run: its config.yaml's world
    assert world_of_model(mini_run / "student").name == "mini"  # a student folder: its UNet config
    assert world_of_model(mini_run / "student" / "unet").name == "mini"
    assert world_of_model("teacher").name == "mini"
    assert world_of_model(tiny_sdxl).name == "sdxl"  # a pipeline folder
    assert world_of_model(tiny_sdxl / "unet").name == "sdxl"  # an SDXL-layout UNet folder (text_time)
    assert world_of_model(tmp_path / "student.safetensors").name == "sdxl"  # a weights file (checked at load)
    with pytest.raises(NitroFusionError, match="no model in"):
        world_of_model(tmp_path)


def test_options_given_are_named_and_checked(mini_run):
    assert GenerateOptions().given() == []
    assert GenerateOptions(fast=True, height=64, num_per_prompt=2).given() == ["--height", "--num-per-prompt",
                                                                               "--fast"]
    world_named("sdxl").check_options("m", GenerateOptions(fast=True, vae="v", base="b", shift=250))
    with pytest.raises(NitroFusionError, match=r"--height, --fast do not apply to .*, a mini-world model; drop them"):
        world_named("mini").check_options(mini_run, GenerateOptions(fast=True, height=64))


def test_generate_with_an_sdxl_flag_on_a_mini_model_is_one_line(mini_run, capsys, tmp_path):
    argv = ["generate", "--model", str(mini_run), "--prompt", "a photo of a bag", "--fast", "--out",
            str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--fast does not apply to" in err and "mini-world model; drop it" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_app_loads_a_mini_model_through_its_world(mini_run):
    from nitrofusion.app.live import make_generator

    run, examples = make_generator(mini_run)
    image = run(examples[0], 2, 7)
    assert image.size == (256, 256) and examples[0] == "a photo of a T-shirt/top"
    with pytest.raises(NitroFusionError, match="--vae does not apply"):
        make_generator(mini_run, vae="somewhere")


@pytest.mark.parametrize("argv, needle", [
    (["export", "RUN", "--format", "diffusers", "--out", "OUT"], "export writes diffusers, single-file and LoRA "
                                                                 "formats of SDXL-family models"),
    (["transfer", "--student", "RUN", "--base", "RUN", "--custom", "RUN", "--out", "OUT"],
     "transfer applies to SDXL-family UNets"),
])
def test_export_and_transfer_of_a_mini_model_are_one_line(mini_run, argv, needle, capsys, tmp_path):
    argv = [str(mini_run) if a == "RUN" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "mini-world model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
