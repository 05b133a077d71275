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
