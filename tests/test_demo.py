"""The demo end to end at a reduced budget, on the shipped teacher and classifier (slow marker; CI runs it)."""

import json
import os
from pathlib import Path

import pytest

from nitrofusion.cli import main

pytestmark = pytest.mark.slow


def test_demo_reduced_budget_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    # the demo's own preset (static pool), cut down, with pairs arriving while training: the first two pair
    # shards made by both processes, the third by the helper while the student trains on those
    argv = ["demo", "--out", str(out), "--eval-samples", "100", "--minutes", "0", "--images", "320",
            "--set", "pairs.count=192", "--set", "pairs.shard_size=64", "--set", "pairs.start_shards=2",
            "--set", "eval_every_images=160",
            "--set", "eval_samples=100", "--set", "checkpoint_every_images=160"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["steps"] >= 2
    for key in ("fid", "accuracy"):
        assert report["teacher"][key] >= 0 and report["teacher_one_step"][key] >= 0
        for steps in ("1", "2", "3", "4"):
            assert report["student"][steps][key] >= 0
    for row in (report["teacher"], report["teacher_one_step"], *report["student"].values()):
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and len(row["class_coverage"]) == 10
    assert report["train"]["iterations"] == 10 and report["train"]["images"] == 320
    assert report["config"]["micro_batch"] == 32 and not report["config"]["pool"]["dynamic"]
    assert report["config"]["adversarial"]["regression_weight"] == 10
    assert report["config"]["adversarial"]["regression_rows"] == "all"
    assert report["config"]["adversarial"]["regression_refine_until"] == 3200  # the preset's budget: every step
    assert report["config"]["pairs"]["start_shards"] == 2 and report["config"]["pairs"]["shard_size"] == 64
    timing = report["timing"]
    assert all(timing[k] > 0 for k in ("teacher_pairs_seconds", "train_seconds", "eval_seconds", "total_seconds"))
    assert timing["waited_for_pairs_seconds"] >= 0
    # the shard made beside training is in the cache's index once training ends: the next demo finds all three
    from nitrofusion.data.pairs import load_pairs

    (index,) = [p for p in Path(os.environ["NITROFUSION_CACHE"]).rglob("pairs.json")
                if json.loads(p.read_text())["count"] == 192]
    assert len(load_pairs(index.parent)) == 192
    for name in ("report.md", "grid.png", "fid_curve.png", "run/student/unet/config.json"):
        assert (out / name).exists(), name
    # 10 adversarial steps already improve 1-step quality over the initial weights (~45 -> ~24 here)
    curve = [json.loads(x)["eval"]["fid"] for x in (out / "run" / "log.jsonl").read_text().splitlines()
             if "eval" in x]
    assert len(curve) == 3 and curve[-1] < 0.85 * curve[0]
    markdown = (out / "report.md").read_text()
    assert "classifier-FID" in markdown
    assert "+ 10 x mean squared error to the teacher's sample from the same x_T (every step)" in markdown
    printed = capsys.readouterr().out
    assert "student 1 step(s): classifier-FID" in printed
    assert "expected about" in printed and "s left (training, evaluation)" in printed


@pytest.mark.parametrize("budget, rows", [
    (3200, "(every step)"),
    (14720, "(every step for the first 3,200 training images, then the first step)"),
])
def test_report_names_where_the_refinement_regression_stopped(budget, rows):
    from nitrofusion.studies.demo import _loss_line

    adv = {"regression_weight": 10, "regression_rows": "all", "regression_refine_until": 3200}
    assert _loss_line({"adversarial": adv, "max_images": budget}).endswith(rows + ".")
