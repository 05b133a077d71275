"""`nitrofusion bench` runs the SDXL, SD3 and FLUX training iterations end to end (tiny size on CPU here); the
numbers are measurements, so the test checks their presence and sanity, never a time limit."""

import json

from nitrofusion.cli import main


def test_bench_measures_every_stage_of_an_sdxl_iteration_and_writes_json(tmp_path, capsys):
    assert main(["bench", "--size", "tiny", "--iters", "1", "--warmup", "0", "--set", "micro_batch=2",
                 "--out", str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out
    assert "TFLOP/s" in printed and "| training iteration" in printed
    result = json.loads((tmp_path / "b.json").read_text())
    stages = [r["stage"] for r in result["rows"]]
    assert len(stages) == 6 and any("training iteration" in s for s in stages)
    assert all(r["seconds"] > 0 and r["images_per_second"] > 0 for r in result["rows"])
    train = next(r for r in result["rows"] if "training iteration" in r["stage"])
    fwd_bwd = next(r for r in result["rows"] if "student forward" in r["stage"])
    assert train["tflop"] > fwd_bwd["tflop"] > 0  # the iteration does the student's work and the backbone's
    assert (result["heads_active"], result["heads"], result["micro_batch"]) == (120, 480, 2)


def test_lora_parameter_count_of_the_memory_model_is_peft_s(tiny_cfg):
    from nitrofusion.models.student import add_lora, lora_parameter_count, trainable_state
    from nitrofusion.worlds.sdxl.testing import build_sdxl_unet

    unet = build_sdxl_unet("tiny")
    cfg = tiny_cfg("student.kind=lora", "student.rank=3")
    predicted = lora_parameter_count(unet, cfg.student)
    add_lora(unet, 3, 0, 0, cfg.student.targets)
    assert predicted == sum(p.numel() for p in trainable_state(unet).values()) > 0


def test_saved_bytes_counts_what_autograd_keeps_once_and_not_the_weights():
    import torch

    from nitrofusion.training.memory import CheckpointCounter, SavedBytes

    lin1, lin2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
    exclude = {p.untyped_storage()._cdata for p in (*lin1.parameters(), *lin2.parameters())}
    x = torch.randn(5, 8, requires_grad=True)
    counter = SavedBytes(exclude)
    with counter.hooks():
        lin2(torch.relu(lin1(x)))
    # x (for lin1's weight grad), relu's output (for relu's backward and lin2's weight grad: one storage)
    assert counter.total == 4 * (5 * 8 + 5 * 16)
    counter = SavedBytes(exclude)
    ckpt = CheckpointCounter(counter)
    with counter.hooks():  # lin1+relu checkpointed: only its input is kept, its graph is the recompute peak
        lin2(ckpt(lambda h: torch.relu(lin1(h)), x))
    assert ckpt.peak == 4 * (5 * 8 + 5 * 16) and counter.total == 4 * (5 * 8 + 5 * 16)


def test_memory_model_cli_prints_every_sdxl_preset(tmp_path, capsys):
    assert main(["bench", "--memory", "--fsdp", "2", "4", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    for preset in ("sdxl-realism (full)", "sdxl-realism-lora (lora)", "sdxl-vibrant (full)",
                   "sdxl-vibrant-lora (lora)", "sdxl-realism, FSDP x2 (full)", "sdxl-realism, FSDP x4 (full)"):
        assert preset in out
    result = json.loads((tmp_path / "m.json").read_text())
    # FSDP over N GPUs: each keeps 1/N of the student's weights, gradients and AdamW state, gathers one unit at a time
    plain, x2, x4 = (next(r for r in result["rows"] if r["preset"] == name)
                     for name in ("sdxl-realism", "sdxl-realism, FSDP x2", "sdxl-realism, FSDP x4"))
    for part in ("student weights (fp32)", "student gradients", "student optimiser state"):
        assert x2["parts"][part] == plain["parts"][part] // 2 and x4["parts"][part] == plain["parts"][part] // 4
    gathered = x2["parts"]["FSDP: gathered blocks (this one and the next)"]
    assert 0 < gathered < plain["parts"]["student weights (fp32)"] / 20 and plain["total"] > x2["total"] > x4["total"]
    assert 2.5e9 < result["unet_parameters"] < 2.7e9  # SDXL's UNet, counted on the meta device
    full, lora = result["rows"][0], result["rows"][1]
    assert full["trainable_parameters"] == result["unet_parameters"] > 10 * lora["trainable_parameters"]
    assert full["total"] > lora["total"]
    per_image = result["activations_per_image"]
    assert per_image["1024px, checkpointing on"]["student"] < per_image["1024px, checkpointing off"]["student"]
    assert per_image["512px, checkpointing off"]["student"] < per_image["1024px, checkpointing off"]["student"]


def test_the_sd3_bench_measures_its_iteration_with_t5_released_as_distill_does(tmp_path, capsys):
    assert main(["bench", "--family", "sd3", "--size", "tiny", "--iters", "1", "--warmup", "0",
                 "--out", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "SD3.5 medium tiny random weights" in out and "T5 released" in out
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["preset"] == "sd3-tiny" and len(r["rows"]) == 6 and r["released_text_encoder_bytes"] > 0
    assert all(row["seconds"] > 0 and row["images_per_second"] > 0 for row in r["rows"])
    assert main(["bench", "--family", "sd3", "--inference"]) == 2
    assert "SD3 has no fast path" in capsys.readouterr().err


def test_the_sd3_memory_model_counts_sd35_medium_and_what_the_t5_cache_saves(tmp_path, capsys):
    assert main(["bench", "--memory", "--family", "sd3", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    for run in ("sd35-medium (full)", "sd35-medium-lora (lora)", "sd35-medium-lora, T5 resident (lora)"):
        assert run in out
    r = json.loads((tmp_path / "m.json").read_text())
    assert 2.2e9 < r["transformer_parameters"] < 2.3e9 and 4.7e9 < r["frozen_parameters"]["t5"] < 4.8e9
    full, lora, resident = r["rows"]
    assert full["trainable_parameters"] == r["transformer_parameters"] > 10 * lora["trainable_parameters"]
    assert resident["total"] - lora["total"] == resident["parts"]["T5-XXL"] == 2 * r["frozen_parameters"]["t5"]
    assert full["total"] > resident["total"] > lora["total"] and lora["parts"]["T5-XXL"] == 0
    per_image = r["activations_per_image"]
    assert per_image["1024px, checkpointing on"]["student"] < per_image["1024px, checkpointing off"]["student"]
    assert per_image["512px, checkpointing off"]["student"] < per_image["1024px, checkpointing off"]["student"]


def test_the_flux_bench_measures_its_iteration_with_t5_released_as_distill_does(tmp_path, capsys):
    assert main(["bench", "--family", "flux", "--size", "tiny", "--iters", "1", "--warmup", "0",
                 "--out", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "FLUX.1-dev tiny random weights" in out and "T5 released" in out
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["preset"] == "flux-tiny" and len(r["rows"]) == 6 and r["released_text_encoder_bytes"] > 0
    assert all(row["seconds"] > 0 and row["images_per_second"] > 0 for row in r["rows"])
    assert main(["bench", "--family", "flux", "--inference"]) == 2
    assert "FLUX has no fast path" in capsys.readouterr().err


def test_the_flux_memory_model_counts_flux_dev_the_t5_cache_and_a_sharded_full_student(tmp_path, capsys):
    assert main(["bench", "--memory", "--family", "flux", "--fsdp", "8", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    for run in ("flux-dev-lora (lora)", "flux-dev-lora, T5 resident (lora)", "full flux-dev, FSDP x8 (full)"):
        assert run in out
    assert "80 GB = 74.5 GiB, 48 GB = 44.7 GiB" in out and "GiB per GPU: " in out
    r = json.loads((tmp_path / "m.json").read_text())
    n = r["transformer_parameters"]
    assert 11.8e9 < n < 12.0e9 and 4.7e9 < r["frozen_parameters"]["t5"] < 4.8e9  # FLUX.1-dev's, counted on meta
    lora, resident, x8 = r["rows"]
    assert resident["total"] - lora["total"] == resident["parts"]["T5-XXL"] == 2 * r["frozen_parameters"]["t5"]
    assert lora["parts"]["T5-XXL"] == 0 and n > 10 * lora["trainable_parameters"]
    # FSDP over 8 GPUs: each keeps 1/8 of a full student's weights, gradients and AdamW state
    assert x8["trainable_parameters"] == n and x8["fsdp_processes"] == 8
    for part, per_parameter in (("student weights (fp32)", 4), ("student gradients", 4),
                                ("student optimiser state", 8)):
        assert x8["parts"][part] == per_parameter * (n // 8)
    assert all(set(row["fits"]) == {"80 GB", "48 GB"} for row in r["rows"])
    per_image = r["activations_per_image"]
    on, off = per_image["1024px, checkpointing on"], per_image["1024px, checkpointing off"]
    assert on["student"] < off["student"] and on["backbone_global"] < off["backbone_global"]
    assert on["per_image_peak"] < off["per_image_peak"] and on["recompute_peak"] > 0 == off["recompute_peak"]


def test_the_flux_dry_run_predicts_the_peak_without_t5_and_with_it(tmp_path, capsys):
    """The memory model (worlds/flux/memory.py) on a tiny teacher, from its config and weight headers: keeping T5
    resident costs exactly its weights."""
    from transformers import T5EncoderModel

    from nitrofusion import config
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.worlds import world_named
    from nitrofusion.worlds.flux.testing import build_random_flux

    folder = build_random_flux(tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a red fox\na blue bird\n")
    sets = [f"teacher={folder}", f"prompts.source={tmp_path / 'prompts.txt'}"]
    cached, resident = (world_named("flux").plan_model(config.build(DistillConfig, "distill", "flux-tiny",
                                                                    [*sets, f"flux.t5_cache={c}"]))
                        for c in ("true", "false"))
    t5 = sum(p.numel() for p in T5EncoderModel.from_pretrained(folder / "text_encoder_2").parameters())
    assert cached.peak_bytes > 0 and resident.peak_bytes - cached.peak_bytes == 4 * t5  # fp32: flux-tiny's precision
    assert main(["distill", "--preset", "flux-tiny", "--teacher", str(folder), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "predicted peak" in capsys.readouterr().out and not (tmp_path / "run").exists()


def test_the_step_profile_names_every_part_of_an_optimiser_step(capsys):
    from nitrofusion.training.profile import format_profile
    from nitrofusion.worlds import world_named

    r = world_named("mini").profile("cpu", ["micro_batch=4", "pool.heads_per_slot=2"], steps=1, warmup=0)
    parts = {x["part"] for x in r["rows"]}
    groups = ("global_cond", "local_cond + local_uncond")  # the two crop tasks share one backbone call
    expected = {"student forward", "student backward", "optimisers", "pool refresh", "heads forward (D)",
                "heads backward (D)", "heads forward (G)", *(f"E forward, {v} ({t})" for v in ("real", "fake")
                                                             for t in groups),
                *(f"backward through E ({t})" for t in groups)}
    assert expected <= parts
    assert abs(sum(x["share"] for x in r["rows"]) - 1) < 1e-9 and r["images_per_step"] == 4
    assert r["tflop_per_step"] > 0 and r["matmul_peak_tflops"] > 0 and r["images_per_second"] > 0
    assert "| student backward |" in format_profile(r)
