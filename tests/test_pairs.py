"""Teacher-pair caches: what identifies a pair set."""

import pytest


def test_another_shard_size_is_another_pair_set(mini_adapter, tmp_path):
    """Shard s draws from its own seed, so the shard size changes the pairs: the shared cache keys it, and
    an explicit folder written with another shard size is refused with the fix."""
    from nitrofusion.data.pairs import cache_key, generate_pairs, pair_dir
    from nitrofusion.errors import NitroFusionError
    from nitrofusion.worlds.mini.data import class_prompts

    prompts = class_prompts()
    assert cache_key(mini_adapter, prompts, 40, 0, 1000) != cache_key(mini_adapter, prompts, 40, 0, 20)
    assert pair_dir("", mini_adapter, prompts, 40, 0, 20) != pair_dir("", mini_adapter, prompts, 40, 0)
    out = pair_dir(str(tmp_path), mini_adapter, prompts, 40, 0, 20)
    generate_pairs(mini_adapter, prompts, 40, 0, out, shard_size=20, batch_size=20, progress=False)
    with pytest.raises(NitroFusionError, match=r"shard_size=20, this run asks for 10; set pairs.shard_size=20"):
        generate_pairs(mini_adapter, prompts, 40, 0, out, shard_size=10, batch_size=10, progress=False)


def _pairs(n: int, offset: int = 0):
    import torch

    from nitrofusion.data.pairs import Pairs

    x = torch.arange(offset, offset + n, dtype=torch.float32).view(n, 1, 1, 1)
    return Pairs(x, -x, [f"p{i}" for i in range(offset, offset + n)])


def test_epoch_growth_draws_epoch_e_from_the_first_start_plus_e_shards():
    from nitrofusion.data.pairs import EpochGrowth, PairLoader

    growth = EpochGrowth(start_shards=2, shard_size=10)
    assert [growth.rows(e, 45) for e in range(5)] == [20, 30, 40, 45, 45]
    loader = PairLoader(_pairs(45), 4, seed=3, growth=growth)
    seen = {}
    for _ in range(40):
        epoch = loader.epoch if loader.position + 4 <= len(loader._perm) else loader.epoch + 1
        x_T, _, _, _ = loader.next()
        seen.setdefault(epoch, set()).update(int(v) for v in x_T.flatten())
    assert max(seen[0]) < 20 and max(seen[1]) < 30 and max(seen[2]) < 40 and max(seen[3]) >= 40
    assert len(seen[0]) == 20  # the whole of epoch 0's shards, 5 batches of 4


def test_growing_pairs_give_the_loader_the_same_batches_as_the_whole_set():
    """Shards that arrive while training (the demo's helper) change when rows can be drawn, never which:
    the batches equal those from the whole set in memory, and each shard is fetched only when its epoch
    begins."""
    from nitrofusion.data.pairs import EpochGrowth, GrowingPairs, PairLoader

    whole = _pairs(45)
    fetched = []

    def arrive(offset, n):
        def fetch():
            fetched.append(offset)
            return _pairs(n, offset)
        return fetch

    completed = []
    growing = GrowingPairs([lambda: _pairs(20), arrive(20, 10), arrive(30, 10), arrive(40, 5)], count=45,
                           on_complete=lambda: completed.append(len(fetched)))
    growth = EpochGrowth(start_shards=2, shard_size=10)
    a, b = PairLoader(whole, 4, seed=1, growth=growth), PairLoader(growing, 4, seed=1, growth=growth)
    assert fetched == []
    for step in range(30):
        xa, ya, pa, _ = a.next()
        xb, yb, pb, _ = b.next()
        assert xa.equal(xb) and ya.equal(yb) and pa == pb, step
        if step == 4:  # epoch 0 is 5 batches of the first 20 rows
            assert fetched == []
    assert fetched == [20, 30, 40] and completed == [3]  # the hook ran once, after the last shard
    resumed = PairLoader(GrowingPairs([lambda: _pairs(20), arrive(20, 10), arrive(30, 10), arrive(40, 5)],
                                      count=45), 4, seed=1, growth=growth)
    resumed.load_state(a.state())
    assert resumed.next()[0].equal(a.next()[0])


def test_start_shards_is_checked_against_the_pair_set(tiny_cfg):
    from nitrofusion.errors import ConfigError

    with pytest.raises(ConfigError, match="pairs.start_shards 9 is more than the 4 shards"):
        tiny_cfg("pairs.count=40", "pairs.shard_size=10", "pairs.start_shards=9")
    with pytest.raises(ConfigError, match="less than micro_batch"):
        tiny_cfg("pairs.count=40", "pairs.shard_size=1", "pairs.start_shards=1", "micro_batch=4")
    with pytest.raises(ConfigError, match="applies to a cache of teacher pairs"):
        tiny_cfg("pairs.online=true", "pairs.start_shards=1")
    assert tiny_cfg("pairs.count=40", "pairs.shard_size=10", "pairs.start_shards=2").pairs.start_shards == 2


def test_pairs_are_stored_in_their_dtype_and_read_back_as_float32(mini_adapter, tmp_path):
    """docs/architecture.md, precision: the teacher samples under autocast, its sample leaves it as float32 and is
    rounded to the storage dtype once, at the write; x_T is the float32 draw rounded before the teacher sees it;
    readers return float32. bf16 autocast with float16 storage is the combination that used to fail."""
    import torch
    from safetensors import safe_open

    from nitrofusion.data.pairs import generate_pairs, load_pairs, pair_inputs
    from nitrofusion.worlds.mini.data import class_prompts

    prompts = class_prompts()
    for storage in (torch.float16, torch.bfloat16, torch.float32):
        out = tmp_path / str(storage)
        generate_pairs(mini_adapter, prompts, 8, 0, out, shard_size=4, batch_size=4, progress=False, dtype=storage,
                       amp=torch.bfloat16)
        with safe_open(str(out / "shard-00000.safetensors"), framework="pt") as f:
            assert f.get_tensor("x0").dtype == f.get_tensor("x_T").dtype == storage
        pairs = load_pairs(out)
        assert pairs.x_T.dtype == pairs.x0.dtype == torch.float32
        inputs = pair_inputs(mini_adapter, prompts, 8, 0, 4, storage)
        assert torch.equal(pairs.x_T, inputs.x_T.float())
        assert torch.isfinite(pairs.x0).all()


def test_precision_is_part_of_the_pair_set(mini_adapter):
    """Another storage dtype or autocast dtype gives other numbers, so another cache folder; the float32 /
    no-autocast key is the one caches had before precision was keyed."""
    import torch

    from nitrofusion.data.pairs import cache_key
    from nitrofusion.worlds.mini.data import class_prompts

    prompts = class_prompts()
    keys = {cache_key(mini_adapter, prompts, 40, 0, 20, storage, amp)
            for storage in (torch.float32, torch.float16, torch.bfloat16) for amp in (None, torch.bfloat16)}
    assert len(keys) == 6
    assert cache_key(mini_adapter, prompts, 40, 0, 20) == cache_key(mini_adapter, prompts, 40, 0, 20, torch.float32)


def test_a_smoke_budget_makes_only_the_shards_its_rows_are_in(mini_adapter, tmp_path, tiny_cfg):
    """max_images below pairs.count: only the shards holding the rows the loader draws are made, in the full set's
    cache, and the run reads the very rows it reads with every shard present; a longer run later keeps those
    shards and adds the rest, and the cache is bit for bit the one made in one go."""
    import hashlib

    import torch

    from nitrofusion.data.pair_cache import shards_read, teacher_pairs
    from nitrofusion.data.pairs import PairLoader
    from nitrofusion.distill_config import PairsConfig
    from nitrofusion.worlds.mini.data import class_prompts

    cfg = tiny_cfg("pairs.count=40", "pairs.shard_size=4", "micro_batch=2", "grad_accum=2", "max_images=6")
    first_epoch = torch.randperm(40, generator=torch.Generator().manual_seed(cfg.seed * 7919))
    shards = shards_read(cfg)  # 6 images in whole optimiser steps of 4: 8 rows
    assert shards == sorted({r // 4 for r in first_epoch[:8].tolist()}) and len(shards) < 10
    assert shards_read(tiny_cfg("pairs.count=40", "pairs.shard_size=4", "micro_batch=2", "grad_accum=2",
                                "max_images=40")) is None
    p = PairsConfig(count=40, shard_size=4, batch_size=4)
    prompts = class_prompts()
    smoke = teacher_pairs(mini_adapter, prompts, p, 40, 0, tmp_path / "grown", shards=shards, progress=False)
    assert sorted(f.name for f in (tmp_path / "grown").glob("shard-*")) == [f"shard-{s:05d}.safetensors"
                                                                           for s in shards]
    hashes = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp_path / "grown").glob("shard-*")}
    whole = teacher_pairs(mini_adapter, prompts, p, 40, 0, tmp_path / "whole", progress=False)
    a, b = PairLoader(smoke, 2, cfg.seed), PairLoader(whole, 2, cfg.seed)
    for _ in range(4):
        (xa, ya, pa, _), (xb, yb, pb, _) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and pa == pb
    grown = teacher_pairs(mini_adapter, prompts, p, 40, 0, tmp_path / "grown", progress=False)
    assert all(hashlib.sha256((tmp_path / "grown" / n).read_bytes()).hexdigest() == h for n, h in hashes.items())
    assert torch.equal(grown.x_T, whole.x_T) and torch.equal(grown.x0, whole.x0) and grown.prompts == whole.prompts


def test_mixed_precision_is_refused_where_it_cannot_train(tiny_cfg, monkeypatch):
    import torch

    from nitrofusion.dtypes import check_mixed_precision
    from nitrofusion.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mixed_precision fp16 cannot train: .* use mixed_precision=bf16"):
        tiny_cfg("mixed_precision=fp16")
    check_mixed_precision("bf16", torch.device("cpu"))  # every CPU autocasts to bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match=r"bf16 needs a GPU with bfloat16 .* Tesla V100 has none: set mixed_prec"):
        check_mixed_precision("bf16", torch.device("cuda", 0))
    check_mixed_precision("no", torch.device("cuda", 0))


def test_a_stop_signal_ends_pair_making_after_the_shard_in_hand(mini_adapter, tmp_path, monkeypatch):
    """SIGTERM (a real signal to this process) while shard 2 of 4 is sampled: that shard is written and indexed,
    then the run stops; the rerun makes the rest and the set is bitwise the uninterrupted one."""
    from signals import signalled_on_call

    from nitrofusion import preemption
    from nitrofusion.data import pairs as pairs_mod

    kw = dict(count=32, seed=0, shard_size=8, batch_size=8, progress=False)
    pairs_mod.generate_pairs(mini_adapter, ["a photo of a bag"], out_dir=tmp_path / "straight", **kw)
    real = pairs_mod._teacher_samples
    monkeypatch.setattr(pairs_mod, "_teacher_samples", signalled_on_call(real, 2))  # while shard 2 is sampled
    with preemption.stop_on_signals(), pytest.raises(preemption.Preempted, match="SIGTERM with 2 of this process's 4"):
        pairs_mod.generate_pairs(mini_adapter, ["a photo of a bag"], out_dir=tmp_path / "cut", **kw)
    assert sorted(p.name for p in (tmp_path / "cut").glob("shard-*")) == ["shard-00000.safetensors",
                                                                          "shard-00001.safetensors"]
    monkeypatch.setattr(pairs_mod, "_teacher_samples", real)
    pairs_mod.verify_and_repair(mini_adapter, ["a photo of a bag"], out_dir=tmp_path / "cut", **kw)
    for shard in (tmp_path / "straight").glob("shard-*"):
        assert (tmp_path / "cut" / shard.name).read_bytes() == shard.read_bytes()
    assert (tmp_path / "cut" / "pairs.json").read_bytes() == (tmp_path / "straight" / "pairs.json").read_bytes()
