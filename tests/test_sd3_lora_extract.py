"""`export --format lora --rank N` of a FULL SD3 student on a tiny random StableDiffusion3Pipeline: a truncated SVD
of student - base per Linear and Conv2d of the MMDiT, in diffusers' SD3 LoRA format. At full rank it is the student
exactly where it covers (and stock `load_lora_weights` + fuse gives those weights); at a low rank the report's error
is the one recomputed here, and each layer's factors are its best approximation; bad input is one line."""

import json
import shutil

import pytest
import torch
from cli_helpers import PROMPTS, generate
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nitrofusion.cli import main

WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(teacher folder, a 2-step full distillation of it, a student folder: the teacher's transformer with noise
    added to every tensor, the run's scheduler)."""
    from nitrofusion.worlds.sd3.testing import build_random_sd3

    root = tmp_path_factory.mktemp("sd3-extract")
    folder = build_random_sd3(root / "teacher")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["distill", "--preset", "sd3-tiny", "--teacher", str(folder), "--prompts", str(root / "prompts.txt"),
                 "--out", str(root / "run"), "--set", "student_optim.lr=1e-4"]) == 0
    student = root / "student"
    for part in ("transformer", "scheduler"):
        shutil.copytree(root / "run" / "student" / part, student / part)
    gen = torch.Generator().manual_seed(0)
    base = load_file(str(folder / "transformer" / WEIGHTS))
    save_file({k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
              str(student / "transformer" / WEIGHTS))
    return folder, root / "run", student


def _layers(folder):
    """The LoRA-coverable layers of the folder's SD3 transformer: name -> weight shape."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}


def _read(out):
    """(factors without the `transformer.` prefix, the file's header, the report) of an export."""
    path = out / LORA_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    factors = load_file(str(path))
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in factors)
    return ({k.removeprefix("transformer."): v for k, v in factors.items()}, meta,
            json.loads((out / "lora_report.json").read_text()))


def _product(factors, module, shape):
    """B @ A of one layer in float64, in the layer's weight shape (a conv's A is k x k, its B 1 x 1)."""
    a, b = factors[f"{module}.lora_A.weight"].double(), factors[f"{module}.lora_B.weight"].double()
    return (b.flatten(1) @ a.flatten(1)).reshape(shape)


def _rel(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


def test_at_full_rank_the_lora_is_the_student_where_it_covers_and_loads_in_the_stock_pipeline(sd3, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    from nitrofusion.worlds.pipelines.pipeline import SHIFT_METADATA_KEY
    from nitrofusion.worlds.sd3.pipeline import absent_text_parts

    folder, run, _ = sd3
    layers = _layers(folder)
    assert "pos_embed.proj" in layers and len(layers["pos_embed.proj"]) == 4  # the patch-embedding Conv2d
    full = max(min(s[0], torch.Size(s[1:]).numel()) for s in layers.values())  # every layer's smaller side
    out = tmp_path / "lora"
    assert main(["export", str(run), "--format", "lora", "--rank", str(full), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["lora_report.json", LORA_FILE]
    factors, meta, report = _read(out)
    modules = {k.removesuffix(".lora_A.weight") for k in factors if k.endswith(".lora_A.weight")}
    assert factors.keys() == {f"{m}.lora_{x}.weight" for m in modules for x in "AB"}
    assert modules == layers.keys()  # distillation moved every layer: all Linear layers and the Conv2d are covered
    adapter = json.loads(meta["lora_adapter_metadata"])  # the LoraConfig diffusers' loader rebuilds
    assert adapter["transformer.r"] == full and adapter["transformer.lora_alpha"] == full
    assert set(adapter["transformer.target_modules"]) == modules and meta[SHIFT_METADATA_KEY] == "250"

    # base + B @ A is the student's weight in every covered layer; what LoRA cannot hold (biases) is uncovered
    base = load_file(str(folder / "transformer" / WEIGHTS))
    student = load_file(str(run / "student" / "transformer" / WEIGHTS))
    covered = {f"{m}.weight" for m in modules}
    for m in modules:
        w = f"{m}.weight"
        assert _rel(base[w].double() + _product(factors, m, base[w].shape), student[w]) < 1e-6, m
    energy = {k: float((student[k].double() - base[k].double()).square().sum()) for k in base}
    total, uncovered = sum(energy.values()), sum(v for k, v in energy.items() if k not in covered)
    assert uncovered > 0 and report["relative_error_covered"] < 1e-6
    assert report["uncovered_fraction"] == pytest.approx(uncovered / total, rel=1e-9)
    assert report["relative_error_total"] == pytest.approx((uncovered / total) ** 0.5, rel=1e-4)
    assert report["delta_norm"] == pytest.approx(total ** 0.5, rel=1e-9)
    assert report["lora_layers"] == len(modules) and report["rank"] == full and report["base"] == str(folder)
    assert report["lora_parameters"] == sum(v.numel() for v in factors.values()) and report["shift"] == 250
    assert "MMDiT" in report["covered_modules"] and "patch-embedding conv" in report["covered_modules"]
    assert (f"LoRA rank {full} on {len(modules)} Linear/Conv2d layers" in printed
            and f"{report['relative_error_covered']:.4f} on those layers" in printed
            and printed.strip().endswith(f"exported to {out}"))

    # diffusers' own SD3 loader puts every factor on its layer; fused, the covered weights are the student's and
    # everything else stays the base's
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **absent_text_parts(folder))
    pipe.load_lora_weights(str(out))
    applied = {n for n, mod in pipe.transformer.named_modules() if len(getattr(mod, "lora_A", None) or {})}
    assert applied == modules
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights
    fused = pipe.transformer.state_dict()
    assert fused.keys() == base.keys()
    assert all(_rel(fused[k], student[k]) < 1e-6 for k in covered)
    assert all(torch.equal(fused[k], base[k]) for k in base if k not in covered)

    # the file alone samples on the teacher (its shift from the header), as a LoRA run's file does
    images = generate(out / LORA_FILE, tmp_path / "gen", "--base", str(folder), "--height", "64", "--width", "64",
                      steps=1)
    assert [im.shape for im in images] == [(64, 64, 3)] * len(PROMPTS)


def test_at_a_low_rank_the_report_states_the_error_recomputed_independently(sd3, tmp_path):
    """A student folder and an exported pipeline folder holding the same transformer, each with --base: the same
    factors; each layer's factors are its best rank-2 approximation (Eckart-Young: the residual is the energy of
    the singular values past the second), and the report's errors are the ones recomputed from the files."""
    folder, _, student_dir = sd3
    exported = tmp_path / "exported"
    shutil.copytree(folder, exported)
    shutil.copy(student_dir / "transformer" / WEIGHTS, exported / "transformer" / WEIGHTS)
    results = {}
    for model in (student_dir, exported):
        out = tmp_path / f"lora-{model.name}"
        assert main(["export", str(model), "--format", "lora", "--rank", "2", "--base", str(folder),
                     "--out", str(out)]) == 0
        results[model.name] = _read(out)
    (factors, meta, report), (other, _, other_report) = results["student"], results["exported"]
    assert factors.keys() == other.keys() and all(torch.equal(factors[k], other[k]) for k in factors)
    assert report["shift"] == 250 and other_report["shift"] is None  # a stock scheduler has no shift to carry
    assert {k: v for k, v in report.items() if k != "shift"} == {k: v for k, v in other_report.items() if k != "shift"}
    assert json.loads(meta["lora_adapter_metadata"])["transformer.r"] == 2

    layers = _layers(folder)
    base = load_file(str(folder / "transformer" / WEIGHTS))
    student = load_file(str(student_dir / "transformer" / WEIGHTS))
    assert {k.removesuffix(".lora_A.weight") for k in factors if k.endswith(".lora_A.weight")} == layers.keys()
    residual = optimum = covered = 0.0
    for m, shape in layers.items():
        a, b = factors[f"{m}.lora_A.weight"], factors[f"{m}.lora_B.weight"]
        assert a.shape == (2, *shape[1:]) and b.shape == (shape[0], 2, *([1, 1] if len(shape) == 4 else []))
        delta = student[f"{m}.weight"].double() - base[f"{m}.weight"].double()
        residual += float((delta - _product(factors, m, shape)).square().sum())
        optimum += float(torch.linalg.svdvals(delta.flatten(1))[2:].square().sum())
        covered += float(delta.square().sum())
    weights = {f"{m}.weight" for m in layers}
    uncovered = sum(float((v.double() - base[k].double()).square().sum()) for k, v in student.items()
                    if k not in weights)
    assert residual == pytest.approx(optimum, rel=1e-5)
    assert 0.5 < report["relative_error_covered"] < 1  # noise: two directions hold little of each layer's delta
    assert report["relative_error_covered"] == pytest.approx((residual / covered) ** 0.5, rel=1e-5)
    assert report["relative_error_total"] == pytest.approx(((residual + uncovered) / (covered + uncovered)) ** 0.5,
                                                           rel=1e-5)
    assert report["uncovered_fraction"] == pytest.approx(uncovered / (covered + uncovered), rel=1e-6)
    assert report["delta_norm"] == pytest.approx((covered + uncovered) ** 0.5, rel=1e-9)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(sd3, tmp_path, capsys):
    from nitrofusion.worlds.sd3.testing import build_random_sd3

    folder, run, student = sd3
    lora_run = tmp_path / "lora-run"  # a LoRA run's layout: trained adapters in student/lora (never read here)
    shutil.copytree(run, lora_run, ignore=shutil.ignore_patterns("checkpoints", "pairs*"))
    (lora_run / "student" / "lora").mkdir()
    (lora_run / "student" / "lora" / LORA_FILE).write_bytes(b"")
    other = build_random_sd3(tmp_path / "two-layer", layers=2)  # an SD3 pipeline of another size
    weights = tmp_path / "student.safetensors"
    shutil.copy(student / "transformer" / WEIGHTS, weights)
    cases = [
        ([str(run)], f"{run} is a full student: its LoRA is a truncated SVD of student - base; give --rank N (e.g. 64; "
                     "the report states the error)"),
        ([str(run), "--rank", "0"], "--rank must be >= 1 (got 0)"),
        ([str(lora_run), "--rank", "4"], "trained LoRA adapters, which export hands on exactly; drop --rank"),
        ([str(student), "--rank", "4"], f"{student} is a student folder: a LoRA of student - base needs --base "
                                        "PIPELINE_FOLDER"),
        ([str(student), "--rank", "4", "--base", str(other)], "the student transformer does not match the base "
                                                             "transformer: "),
        ([str(weights), "--rank", "4", "--base", str(folder)], f"{weights} is a weights file: export --format lora "
                                                               "takes a run"),
    ]
    before = set(tmp_path.iterdir())
    capsys.readouterr()  # what building the pipeline printed
    for args, needle in cases:
        assert main(["export", args[0], "--format", "lora", "--out", str(tmp_path / "out"), *args[1:]]) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert set(tmp_path.iterdir()) == before  # no output, no temporary sibling left behind


def test_an_alpha_other_than_the_rank_is_folded_into_b_for_every_loader(tmp_path):
    """ComfyUI reads alpha only from `.alpha` tensors, which diffusers' SD3 format has none of: the file carries
    alpha/rank inside lora_B and alpha = rank, so diffusers and ComfyUI apply the same product."""
    from nitrofusion.worlds.sd3.lora import read_lora, save_lora_files

    gen = torch.Generator().manual_seed(0)
    a, b = "transformer_blocks.0.attn.to_q.lora_A.weight", "transformer_blocks.0.attn.to_q.lora_B.weight"
    factors = {a: torch.randn(4, 32, generator=gen), b: torch.randn(32, 4, generator=gen)}
    save_lora_files(tmp_path, factors, 250, {"r": 4, "lora_alpha": 8, "target_modules": ["to_q"]})
    got, meta, shift = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert int(meta["lora_alpha"]) == int(meta["r"]) == 4 and shift == 250
    assert torch.equal(got[a], factors[a]) and torch.equal(got[b], 2 * factors[b])  # alpha/r = 2: exact
