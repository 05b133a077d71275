"""The ablation's variants and its arguments, checked without torch (`nitrofusion ablate` refuses bad input
in about a second, before the training stack loads)."""

from __future__ import annotations

from .. import config as config_lib
from ..distill_config import DistillConfig
from ..errors import NitroFusionError
from ..sampling.spec import check_step_counts

# name -> (distill preset, overrides, what it changes). PAPER: the paper's ablation (the default set);
# the rest test explanations of how the pool and the multi-step stage behave (issue-driven studies).
VARIANTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "full": ("mini", (), "full method: 480 heads, 3 task types, dynamic sampling, 1% refresh"),
    "global-only": ("mini-global", (), "without multi-scale dual-objective heads (global conditional heads only)"),
    "no-refresh": ("mini-norefresh", (), "without pool refresh"),
    "static": ("mini-static", (), "without dynamic pool (one fixed head per slot, no refresh)"),
    "single-head": ("mini-singlehead", (), "single-head baseline (one head on the mid block, shared by all t*)"),
    # heads per slot, head lr scaled with how often a head trains (1/k of the steps): lr = 1e-3 * k / 4
    "hps1": ("mini", ("pool.heads_per_slot=1", "heads_optim.lr=2.5e-4"),
             "1 head per slot, refreshed 1%, head lr 2.5e-4"),
    "hps2": ("mini", ("pool.heads_per_slot=2", "heads_optim.lr=5e-4"), "2 heads per slot, head lr 5e-4"),
    "hps8": ("mini", ("pool.heads_per_slot=8", "heads_optim.lr=2e-3"), "8 heads per slot, head lr 2e-3"),
    "static-refresh": ("mini", ("pool.heads_per_slot=1",),
                       "1 head per slot at the static pool's head lr 1e-3, refreshed 1% (static + refresh)"),
    "refresh0.5": ("mini", ("pool.refresh_fraction=0.005",), "refresh 0.5% of the pool per step"),
    "refresh2": ("mini", ("pool.refresh_fraction=0.02",), "refresh 2% of the pool per step"),
    # the multi-step stage and the real-data source
    "one-step": ("mini", ("multistep.p=0",), "one-step training only (the paper's objective)"),
    "multistep": ("mini", ("multistep.p=0.5",), "multi-step stage: half the samples train a refinement step"),
    "multistep-p0.25": ("mini", ("multistep.p=0.25",), "multi-step stage: a quarter of the samples refine"),
    "multistep-extra": ("mini", ("multistep.p=0.5", "multistep.mode=extra"),
                        "multi-step stage: every sample one-step, half of them also a refinement step"),
    # (one-step training, so each differs from `one-step` in the real side alone)
    "real-data": ("mini", ("multistep.p=0", "real.source=data"),
                  "real images (Fashion-MNIST train) as the heads' real side"),
    "real-mix": ("mini", ("multistep.p=0", "real.source=mix", "real.share=0.5"),
                 "half real images, half teacher samples"),
    "real-data-r1": ("mini", ("multistep.p=0", "real.source=data", "adversarial.r1_weight=1.0"),
                     "real images, R1 weight 1 on the heads"),
    "real-mix-r1": ("mini", ("multistep.p=0", "real.source=mix", "real.share=0.5", "adversarial.r1_weight=1.0"),
                    "half real, half teacher, R1 weight 1 on the heads"),
    # the paper's own setting: fine-tune a few-step model (--set teacher=RUN, a mini-fewstep run) that is also the
    # teacher (docs/studies/fewstep.md)
    "realism": ("mini-realism", (), "few-step teacher and init, adversarial only, dynamic pool (the paper's setting)"),
    "realism-static": ("mini-realism", ("pool.dynamic=false", "pool.refresh_fraction=0.0"),
                       "the same without the dynamic pool (one fixed head per slot, no refresh)"),
    "realism-singlehead": ("mini-realism", ("pool.tasks=[global_cond]", "pool.levels=[-1]",
                                            "pool.group_by_t_star=false", "pool.dynamic=false",
                                            "pool.refresh_fraction=0.0"),
                           "the same with one head on the mid block, shared by all t*"),
    "realism-norefresh": ("mini-realism", ("pool.refresh_fraction=0.0",), "the same without pool refresh"),
}
# LoRA students (docs/method.md §7): adapters on the teacher's UNet instead of a full copy, at equal images
for _rank in (4, 16, 64):
    for _suffix, _lr, _times in (("", "1e-3", 50), ("-lr2e-4", "2e-4", 10)):
        VARIANTS[f"lora{_rank}{_suffix}"] = (
            "mini-lora", (f"student.rank={_rank}", f"student.alpha={_rank}", f"student_optim.lr={_lr}"),
            f"LoRA student, rank {_rank}, adapter lr {_lr} ({_times}x the full student's)")
PAPER = ("full", "global-only", "no-refresh", "static", "single-head")
REALISM = ("realism", "realism-static", "realism-singlehead", "realism-norefresh")  # need a few-step teacher


def ablation_configs(variants: list[str], seeds: int, seed_start: int, budget_images: int, eval_samples: int,
                     overrides: list[str] | None, steps: list[int],
                     probe_every: int = 0) -> dict[tuple[str, int], DistillConfig]:
    """Every (variant, seed) run's config, all checked before any model loads."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise NitroFusionError(f"unknown ablation variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if seeds < 1 or budget_images < 1 or eval_samples < 10 or seed_start < 0 or probe_every < 0:
        raise NitroFusionError("--seeds >= 1, --seed-start >= 0, --budget >= 1 image, --eval-samples >= 10 and "
                               "--probe-every >= 0 are required")
    check_step_counts(steps)
    teacher = next((o.split("=", 1)[1] for o in overrides or [] if o.startswith("teacher=")), "")
    needs = [v for v in variants if v in REALISM]
    if needs and not teacher:
        raise NitroFusionError(f"variant(s) {needs} fine-tune a few-step teacher: add --set teacher=RUN, a run of "
                               "`nitrofusion distill --preset mini-fewstep`")
    if teacher and not set(variants) <= set(REALISM):
        raise NitroFusionError(f"--set teacher applies to the few-step variants {', '.join(REALISM)} only; run the "
                               "others (against the shipped teacher) in a study of their own")
    seed_range = range(seed_start, seed_start + seeds)
    configs = {(v, seed): config_lib.build(DistillConfig, "distill", VARIANTS[v][0], [
        *(overrides or []), *VARIANTS[v][1], f"max_images={budget_images}", "max_minutes=0", f"seed={seed}",
        f"pool.seed={seed}", f"eval_every_images={probe_every}"]) for v in variants for seed in seed_range}
    if any(c.student.guidance for c in configs.values()):
        raise NitroFusionError("--set student.guidance: ablate scores every run at one guidance scale; study a guided "
                               "student with scripts/guidance_study.py (docs/studies/guidance.md)")
    if probe_every and any(c.real.source != "teacher" for c in configs.values()):
        raise NitroFusionError("--probe-every compares the heads on the teacher pairs they trained on with held-out "
                               "ones: every variant must train on teacher pairs (real.source=teacher)")
    return configs
