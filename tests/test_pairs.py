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
        x_T, _, _ = loader.next()
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
        xa, ya, pa = a.next()
        xb, yb, pb = b.next()
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
