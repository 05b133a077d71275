"""FLUX.1 exports on a tiny random FluxPipeline: `export --format lora` (a LoRA run's trained adapters handed on
exactly, a full student's truncated SVD of student - base) in diffusers' FLUX LoRA format, and `export --format
single-file` (one transformer file in Black Forest Labs' layout, flux1-dev.safetensors'), each checked against stock
diffusers (load_lora_weights, the BFL -> diffusers converter) and against `generate` of the run; the BFL map at
FLUX.1-dev's real width through diffusers' converter unchanged; which world a FLUX / SD3 file goes to; bad input."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from cli_helpers import PROMPTS, generate
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nitrofusion.cli import main

WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
SIZE = ("--height", "64", "--width", "64")


def _export(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", *map(str, argv)]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(teacher folder, a 2-step full distillation, a 2-step LoRA distillation (rank 4, alpha 8), the full run's
    single-file export, what that export printed)."""
    from nitrofusion.worlds.flux.testing import build_random_flux

    root = tmp_path_factory.mktemp("flux-export")
    folder = build_random_flux(root / "teacher")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = ["distill", "--preset", "flux-tiny", "--teacher", str(folder), "--prompts", str(root / "prompts.txt")]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, "--out", str(root / "run"), "--set", "student_optim.lr=1e-4"]) == 0
        assert main([*argv, "--out", str(root / "lora-run"), "--set", "student.kind=lora", "--set", "student.rank=4",
                     "--set", "student.alpha=8", "--set", "student_optim.lr=1e-2"]) == 0
    path = root / "nitro-flux.safetensors"
    printed = _export(root / "run", "--format", "single-file", "--out", path)
    return folder, root / "run", root / "lora-run", path, printed


def _stock(folder, run):
    """A stock FluxPipeline of the teacher folder with the run's TimestepShiftFlowScheduler."""
    from diffusers import FluxPipeline

    from nitrofusion.sampling.flow_scheduler import TimestepShiftFlowScheduler

    pipe = FluxPipeline.from_pretrained(folder, scheduler=TimestepShiftFlowScheduler.from_pretrained(
        run / "student" / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_images(pipe) -> list[np.ndarray]:
    """`generate`'s call (seed 3, 2 steps, one batch): image i's noise from a generator seeded 3 + i."""
    from nitrofusion.worlds.pipelines.pipeline import image_generators

    pipe.scheduler.generator = image_generators(3, 0, len(PROMPTS))
    with torch.no_grad():  # the student's embedded guidance, 3.5, is FluxPipeline's default guidance_scale
        images = pipe(PROMPTS, num_inference_steps=2, height=64, width=64, generator=pipe.scheduler.generator).images
    return [np.asarray(im) for im in images]


def _rel(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


# ---- LoRA ------------------------------------------------------------------------------------------------------


def test_a_lora_runs_adapters_are_handed_on_exactly_and_stock_load_lora_weights_is_generate(flux, tmp_path):
    from nitrofusion.worlds.pipelines.pipeline import SHIFT_METADATA_KEY

    folder, _, lora_run, _, _ = flux
    out = tmp_path / "lora"
    printed = _export(lora_run, "--format", "lora", "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["lora_report.json", LORA_FILE]
    trained = load_file(str(lora_run / "student" / "lora" / LORA_FILE))
    factors = load_file(str(out / LORA_FILE))
    assert factors.keys() == trained.keys() and all(torch.equal(factors[k], trained[k]) for k in trained)
    with safe_open(str(out / LORA_FILE), "pt") as f:
        meta = f.metadata()
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and meta[SHIFT_METADATA_KEY] == "250"
    report = json.loads((out / "lora_report.json").read_text())
    assert report["source"] == "the run's trained LoRA adapters (exact)" and report["rank"] == 4
    assert report["lora_layers"] == len(factors) // 2 and report["shift"] == 250
    assert "diffusers' FLUX LoRA format" in printed and printed.strip().endswith(f"exported to {out}")

    # stock diffusers: the teacher folder, the run's scheduler, load_lora_weights of the exported file
    ours = generate(lora_run, tmp_path / "gen")
    pipe = _stock(folder, lora_run)
    pipe.load_lora_weights(str(out / LORA_FILE))
    assert all(np.array_equal(s, o) for s, o in zip(_stock_images(pipe), ours, strict=True))
    # and the file alone on the teacher (its shift from the header), through generate
    from_file = generate(out / LORA_FILE, tmp_path / "file", "--base", str(folder), *SIZE)
    assert all(np.array_equal(a, b) for a, b in zip(from_file, ours, strict=True))

    # --dtype applies to the factors and nothing else
    half = tmp_path / "bf16"
    _export(lora_run, "--format", "lora", "--dtype", "bf16", "--out", half)
    cast = load_file(str(half / LORA_FILE))
    assert all(cast[k].dtype == torch.bfloat16 and torch.equal(cast[k], trained[k].to(torch.bfloat16))
               for k in trained)


def test_at_full_rank_the_extracted_lora_is_the_full_student_where_it_covers(flux, tmp_path):
    from diffusers import FluxPipeline

    folder, run, _, _, _ = flux
    base = load_file(str(folder / "transformer" / WEIGHTS))
    student = load_file(str(run / "student" / "transformer" / WEIGHTS))
    out = tmp_path / "lora"
    printed = _export(run, "--format", "lora", "--rank", 64, "--out", out)  # 64: the tiny FLUX's widest layer side
    factors = {k.removeprefix("transformer."): v for k, v in load_file(str(out / LORA_FILE)).items()}
    modules = {k.removesuffix(".lora_A.weight") for k in factors if k.endswith(".lora_A.weight")}
    linears = {k.removesuffix(".weight") for k, v in base.items() if k.endswith(".weight") and v.ndim == 2}
    assert modules == linears  # distillation moved every Linear: all are covered (FLUX has no conv)
    for m in modules:
        w = f"{m}.weight"
        delta = factors[f"{m}.lora_B.weight"].double() @ factors[f"{m}.lora_A.weight"].double()
        assert _rel(base[w].double() + delta, student[w]) < 1e-6, m
    report = json.loads((out / "lora_report.json").read_text())
    assert report["relative_error_covered"] < 1e-6 and 0 < report["uncovered_fraction"] < 1
    assert report["rank"] == 64 and report["shift"] == 250 and report["base"] == str(folder)
    assert "FLUX transformer" in report["covered_modules"]
    assert "LoRA rank 64 on 64 Linear layers" in printed

    # diffusers' own FLUX loader puts every factor on its layer; fused, the covered weights are the student's
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(out / LORA_FILE))
    applied = {n for n, mod in pipe.transformer.named_modules() if len(getattr(mod, "lora_A", None) or {})}
    assert applied == modules
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    covered = {f"{m}.weight" for m in modules}
    assert all(_rel(fused[k], student[k]) < 1e-6 for k in covered)
    assert all(torch.equal(fused[k], base[k]) for k in base if k not in covered)


def test_lora_refusals_are_one_line(flux, tmp_path, capsys):
    _, run, lora_run, path, _ = flux
    cases = [((run,), "is a full student: its LoRA is a truncated SVD of student - base; give --rank N"),
             ((lora_run, "--rank", "4"), "trained LoRA adapters, which export hands on exactly; drop --rank"),
             ((path, "--rank", "4"), "is a weights file: export --format lora takes a run"),
             ((run, "--rank", "0"), "--rank must be >= 1 (got 0)")]
    for i, (argv, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["export", *map(str, argv), "--format", "lora", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not out.exists()


# ---- single file -----------------------------------------------------------------------------------------------


def test_the_single_file_has_the_bfl_layout_and_converts_back_bitwise(flux):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from nitrofusion.worlds import world_of_model
    from nitrofusion.worlds.flux.pipeline import GUIDANCE_METADATA_KEY, diffusers_converter
    from nitrofusion.worlds.pipelines.pipeline import SHIFT_METADATA_KEY

    _, run, _, path, printed = flux
    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    block = ["img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
             "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"]
    want = {f"{m}.{p}" for m in ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                                 "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
                                 "final_layer.linear", "final_layer.adaLN_modulation.1") for p in ("weight", "bias")}
    for i in range(3):
        want |= {f"double_blocks.{i}.{m}.{p}" for m in block for p in ("weight", "bias")}
        want |= {f"double_blocks.{i}.{s}_attn.norm.{n}_norm.scale" for s in ("img", "txt") for n in ("query", "key")}
    for i in range(2):
        want |= {f"single_blocks.{i}.{m}.{p}" for m in ("linear1", "linear2", "modulation.lin")
                 for p in ("weight", "bias")}
        want |= {f"single_blocks.{i}.norm.{n}_norm.scale" for n in ("query", "key")}
    assert sd.keys() == want  # the transformer alone, bare keys as flux1-dev.safetensors holds them
    assert sd["double_blocks.0.img_attn.qkv.weight"].shape == (48, 16)  # q, k, v packed
    assert sd["single_blocks.0.linear1.weight"].shape == (112, 16)  # q, k, v and the MLP's input packed
    assert sd["single_blocks.0.linear2.weight"].shape == (16, 80)  # over [attention, mlp]
    student = load_file(str(run / "student" / "transformer" / WEIGHTS))
    ada, final = sd["final_layer.adaLN_modulation.1.weight"], student["norm_out.linear.weight"]
    assert torch.equal(ada[:16], final[16:]) and torch.equal(ada[16:], final[:16])  # (shift, scale) vs (scale, shift)
    assert meta[SHIFT_METADATA_KEY] == "250" and float(meta[GUIDANCE_METADATA_KEY]) == 3.5
    assert meta["modelspec.architecture"] == "flux-1-dev"
    assert "exact for all 144 tensors" in printed and "sample with shift 250, embedded guidance 3.5" in printed
    # diffusers names it FLUX.1-dev and its converter (at the tiny width) gives back the run's transformer bitwise
    assert infer_diffusers_model_type(sd) == "flux-dev"
    back = diffusers_converter(16)(dict(sd))
    assert back.keys() == student.keys() and all(torch.equal(back[k], student[k]) for k in student)
    assert world_of_model(path).name == "flux"


def test_the_bfl_map_at_flux1_devs_width_goes_through_diffusers_converter_unchanged():
    """FLUX.1-dev's 780 tensors (the transformer's real names and first dimensions; one column each, distinct
    values), mapped to BFL names and back through diffusers' converter as it ships (its 3072 width): every tensor
    back in place. The single blocks' [q, k, v, mlp] split and the final modulation's swap are what this checks at
    the real width."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from nitrofusion.worlds.flux.export import transformer_to_bfl
    from nitrofusion.worlds.flux.pipeline import diffusers_converter
    from nitrofusion.worlds.flux.testing import FLUX_DEV

    assert diffusers_converter(3072) is convert_flux_transformer_checkpoint_to_diffusers
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel(**FLUX_DEV).state_dict().items()}
    state, start = {}, 0
    for k, s in shapes.items():  # (rows,) for a vector, (rows, 1) for a matrix: the map only moves rows
        state[k] = torch.arange(start, start + s[0], dtype=torch.int32).reshape(s[0], *([1] if len(s) > 1 else []))
        start += s[0]
    sd = transformer_to_bfl(state)
    assert len(sd) == 780 and sd["single_blocks.37.linear1.weight"].shape[0] == 3 * 3072 + 12288
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_generate_from_the_single_file_is_the_runs_bitwise(flux, tmp_path):
    folder, run, _, path, _ = flux
    ours = generate(run, tmp_path / "run")
    from_file = generate(path, tmp_path / "file", "--base", str(folder), *SIZE)  # shift and guidance from the file
    assert all(np.array_equal(a, b) for a, b in zip(from_file, ours, strict=True))


def test_flux_and_sd3_files_go_to_their_worlds_and_a_base_of_the_other_family_is_one_line(flux, tmp_path, capsys):
    from nitrofusion.worlds import world_of_model
    from nitrofusion.worlds.sd3.testing import build_random_sd3

    folder, run, _, path, _ = flux
    sd3 = build_random_sd3(tmp_path / "sd3", layers=2)
    sd3_file = tmp_path / "sd3-transformer.safetensors"  # diffusers keys, as SD3's transformer folder holds them
    save_file(load_file(str(sd3 / "transformer" / WEIGHTS)), str(sd3_file))
    flux_file = tmp_path / "flux-transformer.safetensors"  # diffusers keys of FLUX: transformer_blocks as SD3's
    save_file(load_file(str(run / "student" / "transformer" / WEIGHTS)), str(flux_file))
    assert [world_of_model(p).name for p in (path, flux_file, sd3_file)] == ["flux", "flux", "sd3"]
    ours = generate(run, tmp_path / "run", steps=1)  # a diffusers-key FLUX file samples as the run too
    from_file = generate(flux_file, tmp_path / "f", "--base", str(folder), "--shift", "250", *SIZE, steps=1)
    assert all(np.array_equal(a, b) for a, b in zip(from_file, ours, strict=True))
    cases = [(path, sd3, "is a FLUX.1 transformer but --base {} is an SD3 pipeline (StableDiffusion3Pipeline): give "
                         "the FLUX.1 pipeline it belongs to"),
             (sd3_file, folder, "is an SD3 transformer but --base {} is a FLUX.1 pipeline (FluxPipeline): give the "
                                "SD3 pipeline it belongs to")]
    capsys.readouterr()
    for model, base, needle in cases:
        out = tmp_path / f"out-{model.stem}"
        assert main(["generate", "--model", str(model), "--base", str(base), "--prompt", "a", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{model} {needle.format(base)}" in err and len(err.splitlines()) == 1, err
        assert not list(out.glob("*.png"))


def test_single_file_refusals_are_one_line_and_leave_nothing(flux, tmp_path, capsys):
    _, run, _, path, _ = flux
    for out, needle in ((tmp_path / "x.ckpt", "writes a .safetensors file; --out"),
                        (path, "already exists; remove it or choose another --out")):
        before = out.stat().st_mtime_ns if out.exists() else None
        assert main(["export", str(run), "--format", "single-file", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert (out.stat().st_mtime_ns if out.exists() else None) == before


def test_transfer_is_exact_arithmetic_carries_shift_and_guidance_and_samples_on_the_custom_base(flux, tiny_sdxl,
                                                                                                   tmp_path, capsys):
    """theta_custom + (theta_student - theta_base) over the transformer in fp32, key by key (docs/method.md §6); the
    student given as its BFL single file gives the same sum (the layout's round trip is exact); the folder output keeps
    the student's scheduler, the file output its shift and embedded guidance in the header; both sample alike on the
    custom base; a UNet family's folder among the three is one line."""
    import shutil

    folder, run, _, single, _ = flux
    custom = tmp_path / "custom"
    shutil.copytree(folder, custom)
    weights = custom / "transformer" / WEIGHTS
    base = load_file(str(weights))
    gen = torch.Generator().manual_seed(3)
    fine_tuned = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    save_file(fine_tuned, str(weights))
    rest = ["--base", str(folder), "--custom", str(custom)]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["transfer", "--student", str(run), *rest, "--out", str(tmp_path / "moved")]) == 0
        assert main(["transfer", "--student", str(single), *rest, "--out", str(tmp_path / "moved.safetensors")]) == 0
    assert "transformer tensors written to" in printed.getvalue() and "(sample with shift 250)" in printed.getvalue()
    student = load_file(str(run / "student" / "transformer" / WEIGHTS))
    moved = load_file(str(tmp_path / "moved" / "transformer" / WEIGHTS))
    assert moved.keys() == student.keys()
    assert all(torch.equal(moved[k], fine_tuned[k].float() + (student[k].float() - base[k].float())) for k in student)
    from_file = load_file(str(tmp_path / "moved.safetensors"))
    assert from_file.keys() == moved.keys() and all(torch.equal(moved[k], v) for k, v in from_file.items())
    with safe_open(str(tmp_path / "moved.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["nitrofusion.shifted_timestep"] == "250" and float(meta["nitrofusion.guidance"]) == 3.5
    scheduler = json.loads((tmp_path / "moved" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_nitrofusion_guidance"] == 3.5 and scheduler["shifted_timestep"] == 250
    size = ["--base", str(custom), *SIZE, "--batch-size", "1"]
    a = generate(tmp_path / "moved", tmp_path / "a", *size, steps=1)
    b = generate(tmp_path / "moved.safetensors", tmp_path / "b", *size, steps=1)  # shift and guidance from its header
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    capsys.readouterr()
    lora = tmp_path / "lora"
    assert main(["export", str(flux[2]), "--format", "lora", "--out", str(lora)]) == 0
    capsys.readouterr()
    for student, custom_in, needle in ((run, tiny_sdxl, "has no FLUX transformer"),
                                       (lora / LORA_FILE, custom, "is a LoRA file: transfer sums whole transformers")):
        assert main(["transfer", "--student", str(student), "--base", str(folder), "--custom", str(custom_in),
                     "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists(), err
