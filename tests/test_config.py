import pytest

from nitrofusion import config
from nitrofusion.distill_config import DistillConfig
from nitrofusion.errors import ConfigError
from nitrofusion.worlds.mini.teacher import TeacherTrainConfig


def test_presets_load_and_validate():
    for name in config.available_presets("distill"):
        cfg = config.build(DistillConfig, "distill", name)
        assert cfg.pool.tasks
    for name in config.available_presets("teacher"):
        config.build(TeacherTrainConfig, "teacher", name)


def test_overrides_are_typed_and_nested():
    cfg = config.build(DistillConfig, "distill", "mini", ["pool.heads_per_slot=2", "adversarial.loss=linear",
                                                          "pool.t_star=[10, 500]", "max_minutes=0.5"])
    assert cfg.pool.heads_per_slot == 2 and cfg.adversarial.loss == "linear"
    assert cfg.pool.t_star == [10, 500] and cfg.max_minutes == 0.5


@pytest.mark.parametrize("overrides, needle", [
    (["pool.heads_per_slots=2"], "did you mean 'heads_per_slot'"),
    (["micro_batch=abc"], "micro_batch: expected an integer"),
    (["adversarial.loss=hinj"], "adversarial.loss"),
    (["pool.tasks=[global]"], "pool.tasks"),
    (["pool.refresh_fraction=2"], "refresh_fraction"),
    (["nonsense"], "key.sub=value"),
    (["adversarial.regression_weight=1", "real.source=data"], "regression_weight needs teacher pairs"),
    (["adversarial.regression_weight=-1"], "regression_weight must be >= 0"),
    (["adversarial.regression_rows=some"], "regression_rows"),
    (["adversarial.regression_weight=1", "adversarial.regression_refine_until=100"],
     "needs adversarial.regression_rows=all"),
    (["adversarial.regression_refine_until=-1"], "regression_refine_until must be >= 0"),
])
def test_bad_config_is_one_clear_error(overrides, needle):
    with pytest.raises(ConfigError) as e:
        config.build(DistillConfig, "distill", "mini", overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown distill preset 'minni'.*mini"):
        config.build(DistillConfig, "distill", "minni")


def test_resolved_config_round_trips(tmp_path):
    cfg = config.build(DistillConfig, "distill", "mini", ["pool.width=16"])
    config.save(cfg, tmp_path / "c.yaml")
    again = config.build(DistillConfig, "distill", None, config_file=tmp_path / "c.yaml")
    assert again == cfg


def _numeric_fields(cls, prefix=""):
    """(dotted key, field, element type) of every int / float / list-of-numbers field, recursively."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_fields(hint, f"{prefix}{f.name}.")
            continue
        item = (typing.get_args(hint) or (None,))[0] if typing.get_origin(hint) is list else hint
        if item in (int, float):
            yield f"{prefix}{f.name}", f, item, typing.get_origin(hint) is list


def _outside(bounds: dict, item: type):
    if "ge" in bounds:
        return item(bounds["ge"] - 1)
    if "gt" in bounds:
        return item(bounds["gt"])
    return item(bounds.get("le", bounds.get("lt")) + 1)


@pytest.mark.parametrize("kind, preset", [("distill", "tiny"), ("teacher", "tiny")])
def test_every_numeric_field_declares_its_range_and_refuses_a_value_outside_it(kind, preset):
    import re

    root = DistillConfig if kind == "distill" else TeacherTrainConfig
    fields = list(_numeric_fields(root))
    assert len(fields) > (40 if kind == "distill" else 12)
    for key, f, item, is_list in fields:
        bounds = f.metadata.get("range")
        assert bounds, f"{key} declares no range: give it one with config.ranged(...)"
        bad = _outside(bounds, item)
        with pytest.raises(ConfigError, match=re.escape(f"{key} must be ")):
            config.build(root, kind, preset, [f"{key}={[bad] if is_list else bad}"])
    with pytest.raises(ConfigError, match="max_minutes must be >= 0"):  # NaN and negatives alike
        config.build(DistillConfig, "distill", "tiny", ["max_minutes=.nan"])


def test_presets_command_describes_every_preset(capsys):
    from nitrofusion.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for kind in ("distill", "teacher"):
        for name in config.available_presets(kind):
            assert config.preset_description(kind, name), f"{kind}-{name}.yaml has no leading comment"
            assert f"  {name:16} {config.preset_description(kind, name)}" in out


def test_every_command_and_option_explains_itself():
    import argparse

    from nitrofusion.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert parser.description, f"`nitrofusion {name} --help` has no description"
        for action in parser._actions:
            assert action.help, f"nitrofusion {name} {action.option_strings} has no help line"


def test_intervals_are_in_images_and_the_old_step_keys_say_so(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'checkpoint_every' is now checkpoint_every_images "
                                          r"\(intervals are counted in images"):
        config.build(DistillConfig, "distill", "tiny", ["checkpoint_every=5"])
    with pytest.raises(ConfigError, match="eval_every_images applies to world 'mini'"):
        config.build(DistillConfig, "distill", "sdxl-tiny", ["eval_every_images=4"])
    # a run folder written before the rename resumes: its step intervals become images (steps x 4 x 2)
    cfg = config.build(DistillConfig, "distill", "tiny")
    old = config.to_dict(cfg)
    for name in ("checkpoint", "eval", "log"):
        old.pop(f"{name}_every_images")
    old.update(checkpoint_every=3, eval_every=2, log_every=1)
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    loaded = config.load(DistillConfig, tmp_path / "config.yaml")
    assert (loaded.checkpoint_every_images, loaded.eval_every_images, loaded.log_every_images) == (24, 16, 8)
