import json

from nitrofusion.cli import main


def test_evaluate_a_run_is_deterministic_and_writes_tables(mini_adapter, tiny_cfg, tmp_path, capsys):
    from nitrofusion.data.pairs import verify_and_repair
    from nitrofusion.training import distill

    pairs = verify_and_repair(mini_adapter, ["a photo of a bag"], 8, 0, tmp_path / "pairs", shard_size=8,
                              batch_size=8, progress=False)
    distill(tiny_cfg(), mini_adapter, pairs, tmp_path / "run", progress=False)
    argv = ["evaluate", "--model", str(tmp_path / "run"), "--steps", "1", "3", "--samples", "40"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [r["steps"] for r in a["rows"]] == [1, 3]
    assert all(r["fid"] >= 0 and 0 <= r["accuracy"] <= 1 and r["fid_to_teacher"] >= 0 for r in a["rows"])
    assert a["rows"] == b["rows"]
    assert (tmp_path / "a" / "grid.png").exists() and "| student | 3 |" in (tmp_path / "a" / "results.md").read_text()
    assert "student 1 step(s): classifier-FID" in capsys.readouterr().out


def test_evaluate_the_teacher_and_bad_steps(tmp_path, capsys):
    assert main(["evaluate", "--model", "teacher", "--samples", "40", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["model"] == "teacher" and row["fid_to_teacher"] < 0.1  # itself, up to sqrtm round-off
    assert main(["evaluate", "--model", "teacher", "--steps", "5", "--out", str(tmp_path)]) == 2
    assert "--steps takes values from 1 to 4" in capsys.readouterr().err
