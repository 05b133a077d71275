"""Odds and ends: a full disk at each kind of write, bad input, no unpickling of untrusted files anywhere."""

import re
from pathlib import Path

import pytest
import torch

from nitrofusion.cli import main
from nitrofusion.data.pairs import verify_and_repair
from nitrofusion.errors import NitroFusionError
from nitrofusion.training import checkpoint as ckpt
from nitrofusion.training import distill

SRC = Path(__file__).resolve().parents[1] / "src" / "nitrofusion"


def _full_disk_at(monkeypatch, point: str) -> None:
    from nitrofusion import faults

    faults.reset()
    monkeypatch.setenv("NITROFUSION_DISK_FULL_AT", point)


def _one_line(error: pytest.ExceptionInfo, what: str, where: Path) -> None:
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot write {what} to {where} (No space left on device; "
                                                       "it needs about ")
    assert re.search(r"needs about [0-9.]+ [MG]iB, [0-9.]+ [MG]iB free there\); free space", message), message


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or ".student." in p.name)


def test_a_full_disk_while_writing_a_pair_shard(mini_adapter, tmp_path, monkeypatch):
    kw = dict(count=32, seed=0, shard_size=8, batch_size=8, progress=False)
    _full_disk_at(monkeypatch, "pairs-shard-write:2")  # the second shard's bytes are on disk, not yet renamed
    with pytest.raises(NitroFusionError) as error:
        verify_and_repair(mini_adapter, ["a photo of a bag"], out_dir=tmp_path / "pairs", **kw)
    _one_line(error, "teacher pairs", tmp_path / "pairs")
    assert [p.name for p in (tmp_path / "pairs").glob("shard-*")] == ["shard-00000.safetensors"]
    assert not _leftovers(tmp_path / "pairs")
    monkeypatch.delenv("NITROFUSION_DISK_FULL_AT")
    assert len(verify_and_repair(mini_adapter, ["a photo of a bag"], out_dir=tmp_path / "pairs", **kw)) == 32


@pytest.mark.parametrize("point, what, folder", [("checkpoint-write:2", "a checkpoint", "checkpoints"),
                                                 ("student-save", "the student", "student")])
def test_a_full_disk_mid_run_is_one_line_and_the_last_checkpoint_survives(mini_adapter, tiny_cfg, tmp_path,
                                                                         monkeypatch, point, what, folder):
    """While the second checkpoint is written (its tensors on disk, the optimiser state not yet), or the student
    folder (its UNet written, the scheduler not yet): no half of either is left where resume or a reader looks,
    the newest complete checkpoint loads, and --resume (once there is space) finishes the run."""
    pairs = verify_and_repair(mini_adapter, ["a photo of a bag"], 16, 0, tmp_path / "pairs", shard_size=8,
                              batch_size=8, progress=False)
    run = tmp_path / "run"
    _full_disk_at(monkeypatch, point)
    with pytest.raises(NitroFusionError) as error:
        distill(tiny_cfg("max_images=32"), mini_adapter, pairs, run, progress=False)
    _one_line(error, what, run / folder)
    assert error.value.args[0].endswith("--resume (the last complete checkpoint is intact)")
    done = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert done[-1] == ("step-00000001" if folder == "checkpoints" else "step-00000004") and len(done) <= 2
    assert not (run / "student").exists() and not _leftovers(run)
    ckpt.load(ckpt.latest(run))  # the newest complete checkpoint loads
    monkeypatch.delenv("NITROFUSION_DISK_FULL_AT")
    distill(tiny_cfg("max_images=32"), mini_adapter, pairs, run, resume=True, progress=False)
    assert (run / "student" / "unet").is_dir() and (run / "student" / "scheduler").is_dir()
    assert not _leftovers(run)


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
    from nitrofusion.worlds.mini.metrics import CLASSIFIER_FILE

    before = CLASSIFIER_FILE.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert CLASSIFIER_FILE.stat().st_mtime_ns == before


def _bad_files(tmp: Path) -> None:
    (tmp / "list.yaml").write_text("- micro_batch: 8\n")
    (tmp / "noise.safetensors").write_bytes(bytes(range(256)) * 8)
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
    (tmp / "afile").write_text("I am a file")
    (tmp / "done" / "checkpoints" / "step-00000001").mkdir(parents=True)


@pytest.mark.parametrize("argv, needle", [
    (["distill", "--out", "R", "--config", "list.yaml"], "must hold a mapping of keys"),
    (["distill", "--out", "R", "--set", "threads=-1"], "threads must be >= 0 and <= 1024 (got -1)"),
    (["distill", "--out", "R", "--set", "max_minutes=-1"], "max_minutes must be >= 0"),
    (["distill", "--out", "R", "--preset", "tiny", "--set", "student_init=noise.safetensors"],
     "student_init noise.safetensors is not a readable safetensors file"),
    (["generate", "--model", "M", "--prompts", "binary.txt", "--out", "G"], "is not UTF-8 text"),
    (["generate", "--model", "M", "--prompt", "a", "--out", "afile"], "--out afile is an existing file"),
    (["generate", "--model", "M", "--prompt", "a", "--num-per-prompt", "0", "--out", "G"],
     "--num-per-prompt must be >= 1"),
    (["generate", "--model", "M", "--prompt", "a", "--seed", str(2**70), "--out", "G"], "--seed must be in [0,"),
    (["demo", "--out", "afile"], "--out afile is an existing file"),
    (["evaluate", "--model", "teacher", "--out", "afile"], "--out afile is an existing file"),
    (["evaluate", "--model", "no-such-run", "--out", "E"], "--model no-such-run does not exist"),
    (["distill", "--out", "done", "--preset", "tiny"], "done already holds a run (checkpoints/); add --resume"),
    (["distill", "--out", "R", "--preset", "tiny", "--set", "max_images=7"], "less than one optimiser step"),
    (["distill", "--out", "R", "--preset", "tiny", "--set", "pairs.count=3"], "pairs.count 3 is smaller than"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _bad_files(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no half-written output


class Payload:  # any non-tensor object makes weights_only loading refuse a file
    pass


def test_a_refused_pickle_is_explained_in_our_words(tmp_path):
    import torch

    from nitrofusion.models.weights import read_weights

    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "evil.bin")
    with pytest.raises(NitroFusionError) as info:
        read_weights(tmp_path / "evil.bin")
    msg = str(info.value)
    assert "pickled Python objects" in msg and "weights_only=False" not in msg and "\x1b" not in msg
    assert len(msg.splitlines()) == 1


def test_a_bug_is_one_line_with_a_pointer_to_debug(capsys, monkeypatch):
    import nitrofusion.cli as cli

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_presets", broken)
    assert main(["presets"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "RuntimeError: boom" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        main(["--debug", "presets"])


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(mini_adapter, tiny_cfg, tmp_path, capsys):
    from safetensors.torch import load_file

    pairs = verify_and_repair(mini_adapter, ["a photo of a bag"], 16, 0, tmp_path / "pairs", shard_size=8,
                              batch_size=8, progress=False)
    distill(tiny_cfg("max_images=48"), mini_adapter, pairs, tmp_path / "straight", progress=False)
    distill(tiny_cfg("max_images=32"), mini_adapter, pairs, tmp_path / "cut", progress=False)
    newest = tmp_path / "cut" / "checkpoints" / "step-00000004" / "student.safetensors"
    newest.write_bytes(newest.read_bytes()[:200])  # a write cut short
    capsys.readouterr()
    distill(tiny_cfg("max_images=48"), mini_adapter, pairs, tmp_path / "cut", resume=True, progress=False)
    assert "resuming from the older step-00000003 instead" in capsys.readouterr().out
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "step-00000006" / "student.safetensors"))
            for r in ("straight", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the replayed step 4 is the uninterrupted one
    assert [d.name for d in ckpt.checkpoint_dirs(tmp_path / "cut")] == ["step-00000005", "step-00000006"]


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused(mini_adapter, tiny_cfg, tmp_path):
    from safetensors.torch import load_file, save_file

    pairs = verify_and_repair(mini_adapter, ["a photo of a bag"], 16, 0, tmp_path / "pairs", shard_size=8,
                              batch_size=8, progress=False)
    distill(tiny_cfg(), mini_adapter, pairs, tmp_path / "run", progress=False)
    rng_file = ckpt.latest(tmp_path / "run") / "rng.safetensors"
    rng = load_file(str(rng_file))
    rng.update({"trainer.1": rng["trainer.0"].clone(), "torch.1": rng["torch.0"].clone()})  # as if 2 processes wrote it
    save_file(rng, str(rng_file))
    with pytest.raises(NitroFusionError, match=r"written by 2 process\(es\), this run has 1; resume with the same"):
        distill(tiny_cfg("max_images=32"), mini_adapter, pairs, tmp_path / "run", resume=True, progress=False)



def test_a_teacher_of_another_family_is_refused_before_out_is_created(tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "X"
    assert main(["distill", "--preset", "sd3-tiny", "--teacher", str(tiny_sdxl), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "but world 'sd3' needs an SD3 pipeline" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("flags, needle", [
    (["--steps", "5"], "steps must be 1, 2, 3 or 4 (got 5)"),
    (["--seed", "-1"], "--seed must be in [0, 2**63 - 2**32] (got -1)"),
    (["--height", "100"], "--height must be a positive multiple of 8 (got 100)"),
    (["--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
])
def test_generate_checks_its_values_before_looking_at_the_model(flags, needle, tmp_path, capsys):
    """No model exists at --model: the value is refused first, without loading anything."""
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "a", *flags,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


class _Payload:
    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def test_a_pickle_with_objects_is_refused_in_one_line_and_never_run(tiny_sdxl, tmp_path, capsys):
    import torch

    torch.save({"conv_in.weight": torch.zeros(1), "x": _Payload()}, tmp_path / "evil.pt")
    assert main(["generate", "--model", str(tmp_path / "evil.pt"), "--base", str(tiny_sdxl), "--shift", "250",
                 "--prompt", "a", "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert "PAYLOAD RAN" not in out + err and len(err.strip().splitlines()) == 1
    assert "pickled Python objects beyond plain tensors, which are never loaded" in err
