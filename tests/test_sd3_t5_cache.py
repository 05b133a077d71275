"""SD3's T5 states cached with the teacher pairs (data/text_cache.py): stored in T5's own dtype, read back they are
the live encoding bit for bit, and a run that releases T5 trains the very student a run with T5 resident trains."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nitrofusion.cli import main
from nitrofusion.errors import NitroFusionError

PROMPTS = ["a red fox in the snow", "a blue bird", "an old car", "a tall tree"]


@pytest.fixture(scope="module")
def sd3_t5(tmp_path_factory):
    """(an SD3 folder with a tiny T5, its prompt file)."""
    from nitrofusion.worlds.sd3.testing import build_random_sd3

    root = tmp_path_factory.mktemp("sd3-t5")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return build_random_sd3(root / "teacher", t5=True), root / "prompts.txt"


def _cfg(folder, prompts, pairs_dir, *sets):
    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig

    return config.build(DistillConfig, "distill", "sd3-tiny", [f"teacher={folder}", f"prompts.source={prompts}",
                                                                 f"pairs.dir={pairs_dir}", *sets])


@pytest.mark.parametrize("t5_dtype", [torch.float32, torch.bfloat16])
def test_the_t5_cache_equals_the_live_encoding(sd3_t5, tmp_path, t5_dtype):
    from nitrofusion.data.pair_cache import training_data
    from nitrofusion.worlds import world_named
    from nitrofusion.worlds.sd3.adapter import SD3Adapter

    folder, prompts = sd3_t5
    cfg = _cfg(folder, prompts, tmp_path / "pairs")
    adapter = SD3Adapter(folder, cfg.sd3)
    adapter.pipe.text_encoder_3.to(t5_dtype)
    t5_bytes = sum(p.numel() * p.element_size() for p in adapter.pipe.text_encoder_3.parameters())
    training_data(cfg, adapter, world_named("sd3").prompts(cfg, verbose=False))
    with safe_open(str(tmp_path / "pairs" / f"{cfg.pairs.count}-{cfg.pairs.seed}" / "shard-00000.safetensors"),
                   "pt") as f:
        assert f.get_slice("text.t5").get_dtype() == {torch.float32: "F32", torch.bfloat16: "BF16"}[t5_dtype]
        stored = f.get_tensor("text.t5")
        shard_prompts = json.loads(f.metadata()["prompts"])
    live = adapter.encode_prompts(PROMPTS)
    null = adapter.null_cond(live)
    assert torch.equal(stored, adapter.cacheable_text(shard_prompts)["t5"])  # stored as T5 gave it
    assert adapter.release_cached_encoders() == t5_bytes  # the tied embedding counted once
    assert adapter.t5_released and adapter.pipe.text_encoder_3 is None
    assert adapter.release_cached_encoders() == 0  # once only
    cached = adapter.encode_prompts(PROMPTS)
    assert cached.keys() == live.keys() and all(torch.equal(cached[k], live[k]) for k in live)
    after = adapter.null_cond(cached)
    assert all(torch.equal(after[k], null[k]) for k in null)
    with pytest.raises(NitroFusionError, match="not among the teacher pairs' cached prompts"):
        adapter.encode_prompts(["a prompt no pair has"])


def test_a_run_without_t5_resident_trains_the_same_student(sd3_t5, tmp_path, capsys):
    folder, prompts = sd3_t5
    base = ["distill", "--preset", "sd3-tiny", "--teacher", str(folder), "--prompts", str(prompts)]
    for cache in ("true", "false"):
        assert main([*base, "--out", str(tmp_path / cache), "--set", f"sd3.t5_cache={cache}",
                     "--set", f"pairs.dir={tmp_path / ('pairs-' + cache)}"]) == 0
        released = "text encoder released" in capsys.readouterr().out
        assert released == (cache == "true")
    a, b = (load_file(str(tmp_path / c / "student" / "transformer" / "diffusion_pytorch_model.safetensors"))
            for c in ("true", "false"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # pairs made without the cache cannot serve a run that releases T5: one line, before training
    assert main([*base, "--out", str(tmp_path / "mixed"), "--set", "sd3.t5_cache=true",
                 "--set", f"pairs.dir={tmp_path / 'pairs-false'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the check of the shards' progress bar
    assert "holds no cached prompt states" in err and "sd3.t5_cache=false" in err
    assert not (tmp_path / "mixed" / "student").exists()


def test_the_dry_run_predicts_the_peak_without_t5_and_with_it(sd3_t5, tmp_path, capsys):
    """The memory model (worlds/sd3/memory.py) on this teacher, from its config and weight headers: keeping T5
    resident costs exactly its weights."""
    from nitrofusion.worlds import world_named

    folder, prompts = sd3_t5
    cached, resident = (world_named("sd3").plan_model(_cfg(folder, prompts, tmp_path, f"sd3.t5_cache={c}"))
                        for c in ("true", "false"))
    from transformers import T5EncoderModel

    t5 = sum(p.numel() for p in T5EncoderModel.from_pretrained(folder / "text_encoder_3").parameters())
    assert cached.peak_bytes > 0 and resident.peak_bytes - cached.peak_bytes == 4 * t5  # fp32: sd3-tiny's precision
    assert main(["distill", "--preset", "sd3-tiny", "--teacher", str(folder), "--prompts", str(prompts),
                 "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "predicted peak" in capsys.readouterr().out and not (tmp_path / "run").exists()
