"""LoRA students (student.kind=lora): one UNet shared by student, backbone E and teacher; only the adapters
train, checkpoint, resume and export; a LoRA run's export is the trained adapters themselves."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nitrofusion.cli import main
from nitrofusion.data.pairs import verify_and_repair
from nitrofusion.errors import NitroFusionError
from nitrofusion.training import build_student, distill

LORA = ("student.kind=lora", "student.rank=4", "student_optim.lr=1e-3")


@pytest.fixture()
def adapter(tiny_teacher):
    """A private teacher: these tests add adapters to it."""
    from nitrofusion.worlds.mini.adapter import MiniAdapter

    return MiniAdapter(copy.deepcopy(tiny_teacher))


@pytest.fixture(scope="module")
def pairs(tiny_teacher, tmp_path_factory):
    from nitrofusion.worlds.mini.adapter import MiniAdapter

    prompts = ["a photo of a bag", "a photo of a sandal", "a photo of a trouser"]
    return verify_and_repair(MiniAdapter(tiny_teacher), prompts, 16, 0, tmp_path_factory.mktemp("pairs"),
                             shard_size=8, batch_size=8, progress=False)


def _inputs(adapter, n=3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((n, *adapter.latent_shape()), generator=gen)
    return x, torch.tensor([10, 500, 999][:n]), adapter.encode_prompts(["a photo of a bag"] * n)


def _nonzero_adapters(student):
    from nitrofusion.models.student import trainable_state

    with torch.no_grad():
        for p in trainable_state(student).values():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_unet_and_its_base_is_the_plain_teacher_bitwise(adapter, tiny_cfg, checkpointing):
    from nitrofusion.method.backbone import UNetBackbone
    from nitrofusion.models.student import trainable_state

    plain = copy.deepcopy(adapter.teacher_unet)
    storage = {p.data_ptr() for p in adapter.teacher_unet.parameters()}
    n_teacher = sum(p.numel() for p in plain.parameters())
    x, t, cond = _inputs(adapter)
    gen = torch.Generator().manual_seed(1)
    sample_before = adapter.teacher_sample(x, cond, generator=gen)

    cfg = tiny_cfg(*LORA, f"gradient_checkpointing={str(checkpointing).lower()}")
    student = build_student(cfg, adapter)
    assert student is adapter.teacher_unet  # no second UNet: the student IS the teacher module, plus adapters
    lora = trainable_state(student)
    base = [p for n, p in student.named_parameters() if n not in lora]
    assert {p.data_ptr() for p in base} == storage and sum(p.numel() for p in base) == n_teacher
    assert all(p.requires_grad for p in lora.values()) and not any(p.requires_grad for p in base)
    assert all(p.dtype == torch.float32 for p in lora.values()) and len(lora) > 0
    _nonzero_adapters(student)

    # E with adapters off = E of the plain teacher, forward and (through checkpoint recomputation) backward
    feats, grads = [], []
    for unet in (student, plain):
        xi = x.clone().requires_grad_()
        f = adapter.backbone_call(UNetBackbone(unet, checkpointing), xi, t, cond, None)
        sum(m.square().mean() for m in f).backward()
        feats.append([m.detach() for m in f])
        grads.append(xi.grad)
    assert all(torch.equal(a, b) for a, b in zip(*feats, strict=True))
    assert torch.equal(*grads)
    assert all(p.grad is None for p in lora.values())  # E's gradient never reaches the adapters
    # the teacher sampler is the base too; the student (adapters on) is not
    assert torch.equal(adapter.teacher_sample(x, cond, generator=torch.Generator().manual_seed(1)), sample_before)
    with torch.no_grad():
        assert not torch.equal(adapter.unet_call(student, x, t, cond), adapter.unet_call(plain, x, t, cond))


def test_lora_training_trains_only_the_adapters_and_gives_the_teacher_back(adapter, pairs, tiny_cfg, tmp_path):
    from nitrofusion.models.student import has_lora

    teacher = {k: v.clone() for k, v in adapter.teacher_unet.state_dict().items()}
    result = distill(tiny_cfg(*LORA), adapter, pairs, tmp_path, progress=False)
    # the adapter's UNet is the plain teacher again (ablate trains many runs on one adapter)
    assert not has_lora(adapter.teacher_unet)
    now = adapter.teacher_unet.state_dict()
    assert now.keys() == teacher.keys() and all(torch.equal(now[k], teacher[k]) for k in teacher)
    # checkpoints and optimiser state hold the adapters only
    ck = sorted((tmp_path / "checkpoints").iterdir())[-1]
    saved = load_file(str(ck / "student.safetensors"))
    assert saved and all(".lora_A.nitrofusion." in k or ".lora_B.nitrofusion." in k for k in saved)
    optim = torch.load(ck / "optim.pt", weights_only=True)
    assert len(optim["g"]["state"]) == len(saved)
    # the final student is a plain UNet: adapted layers moved, everything else is the teacher's bitwise
    final = result["student"].state_dict()
    assert not has_lora(result["student"]) and final.keys() == teacher.keys()
    moved = {k for k in teacher if not torch.equal(final[k], teacher[k])}
    assert moved and all(k.endswith(".weight") and any(f".{t}." in f".{k}" for t in
                                                        ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                         "ff.net.2", "conv1", "conv2")) for k in moved)
    lora_dir = tmp_path / "student" / "lora"
    factors = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    assert len(factors) == len(saved) and (lora_dir / "kohya_lora.safetensors").is_file()


def test_lora_resume_reaches_the_same_adapters(adapter, pairs, tiny_cfg, tmp_path):
    distill(tiny_cfg(*LORA, "max_images=32"), adapter, pairs, tmp_path / "straight", progress=False)
    distill(tiny_cfg(*LORA, "max_images=16"), adapter, pairs, tmp_path / "split", progress=False)
    distill(tiny_cfg(*LORA, "max_images=32"), adapter, pairs, tmp_path / "split", resume=True, progress=False)
    a, b = ({part: load_file(str(sorted((run / "checkpoints").iterdir())[-1] / f"{part}.safetensors"))
             for part in ("student", "ema")} for run in (tmp_path / "straight", tmp_path / "split"))
    for part in ("student", "ema"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_lora_init_from_an_exported_lora_and_the_wrong_kinds_are_refused(adapter, pairs, tiny_cfg, tmp_path):
    distill(tiny_cfg(*LORA), adapter, pairs, tmp_path / "a", progress=False)
    factors = tmp_path / "a" / "student" / "lora" / "pytorch_lora_weights.safetensors"
    cfg = tiny_cfg(*LORA, f"student_init={factors}")
    student = build_student(cfg, adapter)
    from nitrofusion.models.student import peft_factors, remove_lora

    got, want = peft_factors(student), {k.removeprefix("unet."): v for k, v in load_file(str(factors)).items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    remove_lora(student)
    with pytest.raises(NitroFusionError, match="student.rank and student.targets to the file's"):
        build_student(tiny_cfg(*LORA, "student.rank=8", f"student_init={factors}"), adapter)
    remove_lora(adapter.teacher_unet)
    with pytest.raises(NitroFusionError, match="holds LoRA factors, but student.kind is full"):
        build_student(tiny_cfg(f"student_init={factors}"), adapter)
    full = tmp_path / "unet.safetensors"
    save_file(adapter.teacher_unet.state_dict(), str(full))
    with pytest.raises(NitroFusionError, match="is a full UNet, but student.kind is lora"):
        build_student(tiny_cfg(*LORA, f"student_init={full}"), adapter)
    # a full student from a full UNet file: loaded exactly; a file with a key missing is one line
    student = build_student(tiny_cfg(f"student_init={full}"), adapter)
    assert all(torch.equal(v, load_file(str(full))[k].float()) for k, v in student.state_dict().items())
    state = load_file(str(full))
    del state["conv_in.weight"]
    save_file(state, str(full))
    with pytest.raises(NitroFusionError, match=r"student_init .* does not match the teacher UNet: 1 missing.*conv_in"):
        build_student(tiny_cfg(f"student_init={full}"), adapter)


@pytest.mark.parametrize("sets, needle", [
    (["student.kind=lora", "student.rank=0"], "student.rank must be >= 1 and <= 4096 (got 0)"),
    (["student.kind=lora", "student.targets=[to_q,to_qq]"], "student.targets: 'to_qq' matches no layer of the "
                                                             "UNet; valid names include"),
    (["student.kind=lora", "student.targets=[]"], "student.targets is empty"),
    (["student.kind=lora", "student.dropout=1"], "student.dropout must be >= 0 and < 1"),
    (["student.kind=lora", "student_init=NOFILE"], "student_init file not found"),
])
def test_lora_bad_input_is_one_line_exit_2(sets, needle, tmp_path, capsys):
    argv = ["distill", "--preset", "tiny", "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s.replace("NOFILE", str(tmp_path / "none.safetensors"))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- SDXL: the exported adapters are the training-time student ------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_sdxl")
    (root / "prompts.txt").write_text("a red cat\na photo of a dog\n")
    assert main(["distill", "--preset", "sdxl-tiny", "--teacher", str(tiny_sdxl), "--prompts",
                 str(root / "prompts.txt"), "--out", str(root / "run"), "--set", "student.kind=lora",
                 "--set", "student.rank=4", "--set", "student.alpha=8", "--set", "student_optim.lr=1e-2"]) == 0
    return root / "run"


def _sdxl_inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([249]),
            {"encoder_hidden_states": torch.randn(1, 77, 64, generator=gen),
             "added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=gen),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}})


def test_lora_export_is_the_training_time_student_bitwise(lora_run, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.models.student import load_trainable_state
    from nitrofusion.worlds.sdxl.adapter import SDXLAdapter

    out = tmp_path / "lora"
    assert main(["export", str(lora_run), "--format", "lora", "--out", str(out)]) == 0
    report = json.loads((out / "lora_report.json").read_text())
    assert report["rank"] == 4 and report["alpha"] == 8 and "exact" in report["source"]
    # the training-time student: the teacher UNet with our adapters, the last checkpoint's factors loaded
    cfg = config.load(DistillConfig, lora_run / "config.yaml")
    student = build_student(cfg, SDXLAdapter(tiny_sdxl, cfg.sdxl)).eval()
    ck = sorted((lora_run / "checkpoints").iterdir())[-1]
    load_trainable_state(student, load_file(str(ck / "student.safetensors")))
    x, t, cond = _sdxl_inputs()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    with torch.no_grad():
        want, plain = student(x, t, **cond).sample, pipe.unet(x, t, **cond).sample
        pipe.load_lora_weights(str(out))  # diffusers' own loader, rank/alpha/targets from the file's metadata
        got = pipe.unet(x, t, **cond).sample
    assert torch.equal(got, want) and not torch.equal(got, plain)
    with torch.no_grad():  # the kohya file (A1111/ComfyUI names, alpha tensor) gives the same student
        kohya = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        kohya.load_lora_weights(str(out), weight_name="kohya_lora.safetensors")
        torch.testing.assert_close(kohya.unet(x, t, **cond).sample, want, rtol=1e-5, atol=1e-5)
        # --format diffusers merges the adapters (the run's student/unet): equal up to fp32 rounding
        assert main(["export", str(lora_run), "--format", "diffusers", "--out", str(tmp_path / "merged")]) == 0
        merged = StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(merged.unet(x, t, **cond).sample, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("argv, needle", [
    (["export", "LORA", "--format", "lora", "--rank", "8", "--out", "T/o"], "trained LoRA adapters, which export "
                                                                            "hands on exactly; drop --rank"),
    (["export", "FULL", "--format", "lora", "--out", "T/o"], "is a full student: its LoRA is a truncated SVD"),
])
def test_lora_export_bad_input(lora_run, tiny_sdxl, tmp_path, capsys, argv, needle):
    subs = {"LORA": str(lora_run), "FULL": str(tiny_sdxl)}
    argv = [subs.get(a, a).replace("T/", str(tmp_path) + "/") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_on_a_fused_teacher_lora_the_student_is_both_loras_stacked(tiny_sdxl, tmp_path):
    """The Vibrant recipe: Hyper-SDXL's LoRA fused into the teacher at 0.125, our adapters trained on top.
    A stock pipeline with both LoRAs as adapters (0.125 and 1.0) reproduces the training-time student."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.models.student import load_trainable_state
    from nitrofusion.worlds.sdxl.adapter import SDXLAdapter
    from nitrofusion.worlds.sdxl.testing import build_sdxl_unet

    unet = build_sdxl_unet("tiny", seed=1)  # the folder's UNet, with a random "Hyper-SDXL" LoRA
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "hyper", unet_lora_layers=get_peft_model_state_dict(unet))
    (tmp_path / "prompts.txt").write_text("a red cat\na photo of a dog\n")
    assert main(["distill", "--preset", "sdxl-tiny", "--teacher", str(tiny_sdxl), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "run"),
                 "--set", f"sdxl.teacher_lora={tmp_path / 'hyper'}", "--set", "sdxl.lora_scale=0.125",
                 "--set", "student.kind=lora", "--set", "student.rank=4", "--set", "student_optim.lr=1e-2"]) == 0
    assert main(["export", str(tmp_path / "run"), "--format", "lora", "--out", str(tmp_path / "nitro")]) == 0
    cfg = config.load(DistillConfig, tmp_path / "run" / "config.yaml")
    student = build_student(cfg, SDXLAdapter(tiny_sdxl, cfg.sdxl)).eval()  # Hyper fused at 0.125, then ours
    ck = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    load_trainable_state(student, load_file(str(ck / "student.safetensors")))
    x, t, cond = _sdxl_inputs()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(str(tmp_path / "hyper"), adapter_name="hyper")
    pipe.load_lora_weights(str(tmp_path / "nitro"), adapter_name="nitro")
    with torch.no_grad():
        want = student(x, t, **cond).sample
        pipe.set_adapters(["hyper", "nitro"], [0.125, 1.0])
        torch.testing.assert_close(pipe.unet(x, t, **cond).sample, want, rtol=1e-4, atol=1e-5)
        pipe.set_adapters(["nitro"], [1.0])  # without the teacher's LoRA it is another model
        assert (pipe.unet(x, t, **cond).sample - want).abs().max() > 1e-3


def test_a_lora_student_skips_non_finite_steps_like_a_full_one(adapter, pairs, tiny_cfg, tmp_path, monkeypatch):
    from nitrofusion.method.pool import HeadPool

    logits = HeadPool.logits_many
    monkeypatch.setattr(HeadPool, "logits_many", lambda self, *a: [x * torch.nan for x in logits(self, *a)])
    with pytest.raises(NitroFusionError, match="non-finite loss or gradient"):
        distill(tiny_cfg(*LORA, "max_images=400"), adapter, pairs, tmp_path, progress=False)
    ck = sorted((tmp_path / "checkpoints").iterdir())[-1]
    saved = load_file(str(ck / "student.safetensors"))
    lora_b = [v for k, v in saved.items() if ".lora_B." in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)  # B still at its zero init: no step taken
    from nitrofusion.models.student import has_lora

    assert not has_lora(adapter.teacher_unet)  # given back even when the run stops with an error
