"""FLUX.1 (FluxPipeline folders: a `FluxTransformer2DModel` of double- and single-stream blocks on 2x2-packed latent
tokens, trained as a rectified flow; dev guidance-distilled, schnell timestep-distilled): the guidance-embedding DiT
family. config.py: the `flux` section; adapter.py: its training calls (packing, guidance embedding, T5 cache;
docs/method.md §8); backbone.py: E as the first N double-stream blocks with heads on 2-D token grids; pipeline.py:
1-4 step inference in a stock FluxPipeline and export; world.py: its World; testing.py: tiny random pipelines."""
