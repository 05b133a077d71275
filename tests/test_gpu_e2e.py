"""scripts/gpu_e2e.py, the first real end-to-end run for a lent GPU, works before a GPU is lent: the same stages on
a tiny random-weight SDXL on the CPU (accelerate launch, SIGKILL after the first checkpoint, resume, every export,
1- and 4-step generation)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_e2e.py"


@pytest.mark.slow
def test_the_gpu_end_to_end_script_runs_at_tiny_size_on_a_cpu(tmp_path):
    env = {**os.environ, "NITROFUSION_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--out", str(tmp_path / "e2e")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "e2e" / "e2e.json").read_text())
    assert summary["ok"] and [r["stage"] for r in summary["stages"]] == [
        "random-weight SDXL folder", "distill, SIGKILL after the first checkpoint", "distill --resume to 3 steps",
        "export --format diffusers", "export --format single-file", "export --format lora", "generate --steps 1",
        "generate --steps 4"]
    assert all(r["ok"] for r in summary["stages"]) and summary["images_per_second"] > 0
    run = tmp_path / "e2e" / "run"
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    config = (run / "config.yaml").read_text()
    assert "mixed_precision: bf16" in config and "dtype: float16" in config  # the preset's precision, as shipped
    assert (tmp_path / "e2e" / "student.safetensors").is_file()
    assert (tmp_path / "e2e" / "generate-4" / "grid.png").is_file()
    assert done.stderr.strip() == ""  # a clean terminal: no dependency's log line
