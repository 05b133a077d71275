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
