"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline folders: an MMDiT `SD3Transformer2DModel` trained as a
rectified flow): the DiT family, end to end. config.py: the `sd3` section (backbone blocks and taps);
adapter.py: its training calls (flow arithmetic, docs/method.md §8); backbone.py: E as the first N transformer
blocks with heads on 2-D token grids; pipeline.py: 1-4 step inference in a stock pipeline and export;
world.py: its World; testing.py: tiny random pipelines for tests."""
