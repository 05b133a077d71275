"""SDXL and SDXL-layout models (world.py: its World; adapter.py: its training calls; pipeline.py: 1-4 step inference in
a stock diffusers pipeline; export.py, fast.py, bench.py, memory.py, testing.py: its exports, fast inference, benches
and random-weight pipelines for tests)."""
