"""`nitrofusion bench` runs the SDXL training iteration end to end (tiny size on CPU here); the numbers
are measurements, so the test checks their presence and sanity, never a time limit."""

import json

from nitrofusion.bench import format_table, run_bench
from nitrofusion.cli import main


def test_bench_measures_every_stage_of_an_sdxl_iteration():
    result = run_bench("tiny", "cpu", iters=1, warmup=0, progress=lambda _: None)
    stages = [r["stage"] for r in result["rows"]]
    assert len(stages) == 6 and any("training iteration" in s for s in stages)
    assert all(r["seconds"] > 0 and r["images_per_second"] > 0 for r in result["rows"])
    train = next(r for r in result["rows"] if "training iteration" in r["stage"])
    fwd_bwd = next(r for r in result["rows"] if "student forward" in r["stage"])
    assert train["tflop"] > fwd_bwd["tflop"] > 0  # the iteration does the student's work and the backbone's
    assert (result["heads_active"], result["heads"], result["micro_batch"]) == (120, 480, 5)
    assert "| training iteration" in format_table(result)


def test_bench_cli_writes_json(tmp_path, capsys):
    assert main(["bench", "--size", "tiny", "--iters", "1", "--warmup", "0", "--set", "micro_batch=2",
                 "--out", str(tmp_path / "b.json")]) == 0
    assert "TFLOP/s" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["micro_batch"] == 2
