"""Issue 6 odds and ends: a full disk mid-run, and no unpickling of untrusted files anywhere."""

import errno
import re
from pathlib import Path

import pytest

from nitrofusion import checkpoint as ckpt
from nitrofusion.cli import main
from nitrofusion.errors import NitroFusionError
from nitrofusion.pairs import verify_and_repair
from nitrofusion.train import distill

SRC = Path(__file__).resolve().parents[1] / "src" / "nitrofusion"


def test_a_full_disk_mid_run_is_one_clear_error_and_the_last_checkpoint_survives(mini_adapter, tiny_cfg,
                                                                                tmp_path, monkeypatch):
    pairs = verify_and_repair(mini_adapter, ["a photo of a bag"], 16, 0, tmp_path / "pairs", shard_size=8,
                              batch_size=8, progress=False)
    real_save = ckpt.save_file

    def filling_disk(tensors, path, *a, **k):
        if "step-00000002" in str(path):  # the first checkpoint fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", filling_disk)
    run = tmp_path / "run"
    with pytest.raises(NitroFusionError, match=r"cannot write a checkpoint .*No space left on device.*--resume"):
        distill(tiny_cfg("max_images=64"), mini_adapter, pairs, run, progress=False)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]  # no half-written folder
    ckpt.load(ckpt.latest(run))  # the newest complete checkpoint loads
    monkeypatch.setattr(ckpt, "save_file", real_save)
    distill(tiny_cfg("max_images=64"), mini_adapter, pairs, run, resume=True, progress=False)
    assert (run / "student" / "unet").is_dir()


def test_an_unwritable_output_folder_is_refused_in_one_line(tmp_path, capsys):
    import os

    if os.geteuid() == 0:  # root ignores permissions: a file in the way is the portable unwritable path
        (tmp_path / "blocked").write_text("not a folder")
        out = tmp_path / "blocked" / "run"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "run"
    assert main(["distill", "--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write to the run folder" in err[0]


def test_no_code_path_unpickles_arbitrary_objects():
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        if re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M):
            offenders.append(f"{path.name}: imports pickle")
    assert not offenders, offenders


@pytest.mark.slow
def test_resume_continues_the_runs_own_config_and_refuses_other_shapes(tmp_path, capsys):
    import json

    run = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--out", str(run)]) == 0
    saved = (run / "config.yaml").read_text()
    capsys.readouterr()
    for extra, needle in ((["--set", "pool.heads_per_slot=3"], "(pool.heads_per_slot differ)"),
                          (["--preset", "mini"], "micro_batch")):
        assert main(["distill", "--out", str(run), "--resume", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "may change only max_images" in err[0]
        assert (run / "config.yaml").read_text() == saved  # refused before anything was written
    # no preset: the run's own (tiny) config, with a longer budget, which a resumed run may change
    assert main(["distill", "--out", str(run), "--resume", "--set", "max_images=32"]) == 0
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and "max_images: 32" in (run / "config.yaml").read_text()
    assert "heads_per_slot: 2" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["teacher", "--preset", "tiny"], "choose where to write: --out DIR (or --replace-shipped"),
    (["classifier"], "choose where to write: --out DIR (or --replace-shipped"),
    (["classifier", "--out", "x", "--replace-shipped"], "give either --out DIR or --replace-shipped"),
])
def test_shipped_assets_are_only_replaced_when_asked(argv, needle, capsys, tmp_path, monkeypatch):
    from nitrofusion.mini.metrics import CLASSIFIER_FILE

    before = CLASSIFIER_FILE.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert CLASSIFIER_FILE.stat().st_mtime_ns == before
