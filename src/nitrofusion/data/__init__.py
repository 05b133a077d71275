"""Training data: prompt sources (prompts.py), teacher pairs and their cache (pairs.py, pair_cache.py), real
images as the heads' real side (real_data.py)."""
