"""A clean terminal (issue 28, item 6): every command, run once as a user runs it (`python -m nitrofusion` in a fresh
process, offline: HF_HUB_OFFLINE=1), writes nothing to stderr but its own lines: its progress bars and, for a
refusal, its one-line error; never a dependency's log line or warning. A refusal leaves nothing behind, and one of a
value checkable before any model loads answers before the model libraries are even imported.

Cheap forms throughout: the mini world's `tiny` preset, chained (distill -> generate, evaluate, export, transfer on
its run), dry runs, and refusals where a real run takes minutes (demo) or more than a test should (ablate, bench).
A fresh process spends most of its seconds importing torch and diffusers, so each command runs once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "gradio")
# Our own progress bars (tqdm, on stderr): the only stderr lines a successful command writes
OWN_BARS = re.compile(r"^(teacher pairs|distill|evaluate|encode real images|teacher): +\d+%\|")
IMPORT_TIME = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$")  # -X importtime: one module a line


def run(cwd: Path, *argv: str, imports: bool = False) -> tuple[int, str, list[str], set[str]]:
    """`python -m nitrofusion ARGV` in a fresh process (`imports`: under -X importtime): exit status, stdout, the
    stderr lines that are not our progress bars, and the top-level packages it imported (with `imports`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"), "OMP_NUM_THREADS": "1"}
    flags = ["-X", "importtime"] if imports else []
    done = subprocess.run([sys.executable, *flags, "-m", "nitrofusion", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    lines, imported = [], set()
    for line in re.split(r"[\r\n]+", done.stderr):
        match = IMPORT_TIME.match(line)
        if match:
            imported.add(match.group(1).split(".")[0])
        elif line.strip() and not OWN_BARS.match(line) and not line.startswith("import time:"):  # its header
            lines.append(line)
    return done.returncode, done.stdout, lines, imported


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(cwd: Path, *argv: str, needle: str, imports: bool = False) -> set[str]:
    """A refusal: exit 2, its one line (holding `needle`) and nothing else on stderr, nothing left behind; the
    packages it imported (with `imports`)."""
    before = tree(cwd)
    code, _, err, imported = run(cwd, *argv, imports=imports)
    assert code == 2 and len(err) == 1 and err[0].startswith("nitrofusion: error: "), (argv, err)
    assert needle in err[0], err[0]
    assert tree(cwd) == before, argv  # no run, output or cache folder begun
    return imported


def succeeded(cwd: Path, *argv: str) -> str:
    code, out, err, _ = run(cwd, *argv)
    assert code == 0 and not err, (argv, code, err)
    return out


@pytest.mark.slow
def test_the_mini_world_chain_writes_only_its_own_lines(tmp_path):
    """distill (its teacher pairs made on the way) -> generate, evaluate and export of the run (the last: a one-line
    refusal, a mini-world run has no other formats; transfer's is the same path, tests/test_worlds.py)."""
    out = succeeded(tmp_path, "distill", "--preset", "tiny", "--out", "run")
    assert "student written to run/student" in out
    assert "wrote 1 image" in succeeded(tmp_path, "generate", "--model", "run", "--prompt", "a photo of a bag",
                                        "--out", "images")
    assert "results: eval/results.md" in succeeded(tmp_path, "evaluate", "--model", "run", "--steps", "1",
                                                   "--samples", "10", "--out", "eval")
    refused(tmp_path, "export", "run", "--format", "diffusers", "--out", "exported", needle="mini-world model")


def test_presets_and_a_pairs_plan(tmp_path):
    """`pairs` as a dry run: its real run is the teacher sampling `distill` does above, a fresh process more."""
    assert "distill presets" in succeeded(tmp_path, "presets")
    out = succeeded(tmp_path, "pairs", "--dry-run", "--preset", "tiny", "--out", "pairs")
    assert "every check passed" in out and not (tmp_path / "pairs").exists()


def test_a_hub_id_offline_is_refused_before_any_model_library_loads(tmp_path):
    (tmp_path / "p.txt").write_text("a red cat\n")
    imported = refused(tmp_path, "distill", "--dry-run", "--preset", "sdxl-tiny", "--teacher", HUB_ID, "--prompts",
                       "p.txt", "--out", "run", needle=f"`hf download {HUB_ID} --local-dir DIR`", imports=True)
    assert not imported & {"diffusers", "transformers"}, imported


@pytest.mark.parametrize("argv, needle", [
    (["app", "--model", "no-such-run"], "--model no-such-run does not exist"),
    (["demo", "--images", "-1", "--out", "demo"], "max_images must be >= 0 (got -1)"),
    (["generate", "--model", "no-such-run", "--shift", "0", "--prompt", "a", "--out", "o"],
     "--shift must be in 1..1000 (got 0)"),  # before the missing model: a value needs no file to be wrong
    (["export", "no-such-run", "--format", "single-file", "--shift", "1001", "--out", "o.safetensors"],
     "--shift must be in 1..1000 (got 1001)"),
])
def test_bad_values_are_refused_before_torch_loads(argv, needle, tmp_path):
    imported = refused(tmp_path, *argv, needle=needle, imports=True)
    assert not imported & set(MODEL_LIBRARIES), imported


@pytest.mark.parametrize("argv, needle", [
    (["bench"], "no GPU here: full-size SDXL takes many minutes per stage on a CPU"),
    (["ablate", "--out", "study", "--variants", "no-such-variant"], "unknown ablation variant(s) ['no-such-variant']"),
])
def test_refusals_of_the_long_commands_are_one_line(argv, needle, tmp_path):
    import torch

    if argv == ["bench"] and torch.cuda.is_available():
        pytest.skip("a GPU is visible: `bench` would run")
    refused(tmp_path, *argv, needle=needle)


def test_dependency_warnings_about_their_own_internals_are_dropped():
    """gradio's pandas deprecations (the live app's first request) and the stock SDXL pipeline's own deprecated
    VAE upcast (bench --inference in fp16): on paths too slow for a subprocess here, so the filter is checked."""
    import warnings

    from nitrofusion.quiet import quiet_dependencies

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet_dependencies()
        warnings.warn_explicit("The copy keyword is deprecated", DeprecationWarning, "queueing.py", 178,
                               module="gradio.queueing")
        sdxl = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"
        warnings.warn_explicit("`upcast_vae` is deprecated and will be removed", FutureWarning, "p.py", 750,
                               module=sdxl)
        warnings.warn_explicit("`other` is deprecated", FutureWarning, "p.py", 750, module=sdxl)
    assert [str(w.message) for w in shown] == ["`other` is deprecated"]  # only the named ones are dropped
