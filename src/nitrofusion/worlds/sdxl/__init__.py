"""SDXL and SDXL-layout models (world.py: its World; adapter.py: its training calls; pipeline.py: 1-4 step inference in
a stock diffusers pipeline; export.py, fast.py, bench.py, memory.py, testing.py: its exports, fast inference, benches
and random-weight pipelines for tests). family.py tells the pipeline families apart: the inference half here also
serves Stable Diffusion 1.x/2.x (worlds/sd/), whose folders it reads as StableDiffusionPipeline."""
