import pytest

from nitrofusion import config
from nitrofusion.distill_config import DistillConfig
from nitrofusion.errors import ConfigError
from nitrofusion.mini.teacher import TeacherTrainConfig


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
