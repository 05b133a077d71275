"""`nitrofusion demo`: the whole method on the embedded mini world, with pictures and measured numbers.

shipped teacher -> teacher pairs -> NitroFusion distillation -> evaluation of the teacher, the teacher
forced to one step, and the student at 1, 2, 3 and 4 steps on the same held-out x_T and prompts
(classifier-FID, accuracy, precision / recall / coverage) -> report.md, report.json, grid, curve.

The budget is counted in images, so every machine trains the same model, only later. Two processes
share the work (helper.py): both generate the training pairs, then the helper generates the held-out
pairs and scores the teacher while the main process trains, then each scores half of the student's step
counts. With one usable core the helper's jobs run inline, with the same numbers.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import config as config_lib
from .. import threads
from ..data.pairs import GrowingPairs, MixedPairs, Pairs, drop_corrupt_shards, load_shard, pair_inputs, write_index_file
from ..data.real_data import training_source
from ..distill_config import DistillConfig
from ..evaluation.viz import plot_curves, save_grid
from ..io import atomic_write_json, atomic_write_text
from ..training import distill
from ..worlds import world_of_config
from ..worlds.mini import demo_jobs
from ..worlds.mini.adapter import MiniAdapter
from ..worlds.mini.data import class_prompts
from ..worlds.mini.evaluation import MiniEvaluation, per_class
from ..worlds.mini.metrics import MiniMetrics
from ..worlds.mini.pairsets import EVAL_SEED_OFFSET, held_out_pairs, pair_dir
from .helper import Helper, Inline, start_helper

STEPS = (1, 2, 3, 4)
MAIN_STEPS, HELPER_STEPS = (1, 4), (2, 3)  # 5 student calls per sample on each side
# The forecast's costs in teacher-UNet image evaluations, measured with the demo's preset on a 2-core AMD
# EPYC at 1 thread per process: one training image (student forward and backward with the multi-step
# stage, the backbone per task, heads, optimisers, the 1-step curve) and the metrics per scored sample
# (classifier features, FID, k-NN manifolds). It is only a forecast: the progress bar shows the time left.
TRAIN_CALLS_PER_IMAGE = 6.5
METRIC_CALLS_PER_SAMPLE = 1.0


class Forecast:
    """Expected time of the demo's phases from one measured unit: the seconds of one teacher-UNet image
    evaluation at the pair batch size, timed at start-up (about a second)."""

    def __init__(self, adapter: MiniAdapter, batch: int) -> None:
        x = torch.randn(batch, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
        cond = adapter.encode_prompts(class_prompts()[:1] * batch)
        t = torch.full((batch,), 500)
        with torch.no_grad():
            adapter.unet_call(adapter.teacher_unet, x, t, cond)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                adapter.unet_call(adapter.teacher_unet, x, t, cond)
        self.call = (time.perf_counter() - start) / (3 * batch)
        spec = adapter.sampler
        self.calls_per_pair = spec.steps * (2 if spec.guidance_scale > 1 else 1)

    def phases(self, train_pairs: int, first_pairs: int, images: int, minutes: float, eval_samples: int,
               processes: int) -> dict[str, float]:
        """Seconds per phase, each split over `processes` the way run_demo splits it: the first
        `first_pairs` training pairs on every process, the rest and the held-out pairs beside training."""
        per_pair = self.calls_per_pair * self.call
        pairs = first_pairs * per_pair / processes
        train = images * TRAIN_CALLS_PER_IMAGE * self.call if images else minutes * 60
        held_out = eval_samples * (self.calls_per_pair + 2) * self.call  # + the teacher at one step
        beside = (train_pairs - first_pairs) * per_pair + held_out
        train = train + beside if processes == 1 else max(train, beside)
        student_calls = sum(STEPS) if processes == 1 else max(sum(MAIN_STEPS), sum(HELPER_STEPS))
        scoring = eval_samples * (student_calls + METRIC_CALLS_PER_SAMPLE) * self.call
        return {"teacher pairs": pairs, "training": train, "evaluation": scoring}


class Progress:
    """Per-phase timings against the forecast; what is left is the forecast scaled by how the finished
    phases compared with theirs (a busy machine runs every phase slower alike), ignoring a phase that was
    mostly skipped."""

    def __init__(self, plan: dict[str, float], log) -> None:
        self.plan, self.log = dict(plan), log
        self.planned_done = self.took = 0.0

    def done(self, phase: str, seconds: float, what: str) -> None:
        planned = self.plan.pop(phase)
        if seconds >= 0.25 * planned:  # a phase mostly skipped (teacher pairs found in the cache) says nothing
            self.planned_done += planned
            self.took += seconds
        line = f"{what}: {seconds:.0f} s"
        if self.plan:
            ratio = self.took / self.planned_done if self.planned_done >= 1 else 1.0
            left = sum(self.plan.values()) * ratio
            line += f"; about {left:.0f} s left ({', '.join(self.plan)})"
        self.log(line)


def run_demo(out: Path, cfg: DistillConfig, eval_samples: int = 2000, resume: bool = False,
             log=print) -> dict:
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    main_threads = threads.apply(cfg.threads)  # 0: the automatic rule (threads.py)
    teacher_path = cfg.teacher or None
    with start_helper(main_threads) as helper:
        if isinstance(helper, Helper):  # it starts up (seconds of imports) while this process loads
            helper.submit(demo_jobs.warm_up, teacher_path)
        adapter = world_of_config(cfg).adapter(cfg)
        metrics = MiniMetrics()
        processes = helper.processes
        forecast = Forecast(adapter, cfg.pairs.batch_size)
        count = cfg.pairs.count if cfg.real.source != "data" else 0
        first = min(count, (cfg.pairs.start_shards or cfg.pairs.shards) * cfg.pairs.shard_size)
        plan = forecast.phases(count, first, cfg.max_images, cfg.max_minutes, eval_samples, processes)
        timing = {"startup_seconds": round(time.time() - started, 1)}
        log(f"demo: {cfg.max_images:,} training images (the same model on any machine), {eval_samples} held-out "
            f"samples, this process at {main_threads} thread(s) and {helper.describe()}; expected about "
            f"{sum(plan.values()):.0f} s on this machine (" + ", ".join(f"{k} {v:.0f} s" for k, v in plan.items())
            + ")")
        progress = Progress(plan, log)

        t0 = time.time()
        train_pairs = training_source(cfg, lambda: _training_pairs(cfg, adapter, helper, teacher_path),
                                      lambda: world_of_config(cfg).real_pairs(cfg, adapter))
        timing["teacher_pairs_seconds"] = round(time.time() - t0, 1)
        ready = (f"first {first:,} of {count:,} teacher pairs ready (the rest are made beside training)"
                 if first < count else f"training data ready ({cfg.real.source})")
        progress.done("teacher pairs", timing["teacher_pairs_seconds"], ready)

        # the helper: held-out pairs and the teacher's rows, while this process trains
        teacher_job = helper.submit(demo_jobs.teacher_rows, teacher_path, eval_samples, cfg.pairs, cfg.seed)
        inputs = pair_inputs(adapter, class_prompts(), eval_samples, cfg.pairs.seed + EVAL_SEED_OFFSET,
                             cfg.pairs.shard_size)
        curve = MiniEvaluation(adapter, inputs, metrics, cfg.adversarial.shift, seed=cfg.seed)
        if not resume and (out / "run").exists():
            shutil.rmtree(out / "run")  # the demo's own folder: a rerun starts afresh unless --resume
        t0 = time.time()
        result = distill(cfg, adapter, train_pairs, out / "run", resume=resume,
                         evaluator=curve.curve(cfg.eval_samples))
        growing = train_pairs.teacher if isinstance(train_pairs, MixedPairs) else train_pairs
        if isinstance(growing, GrowingPairs):  # training may end before the last shard arrived: the index needs it
            growing.wait_for(len(growing))
        teacher = teacher_job.result()
        timing["train_seconds"] = round(time.time() - t0, 1)
        if isinstance(growing, GrowingPairs):  # time training stood still, reading and waiting for shards
            timing["waited_for_pairs_seconds"] = round(growing.waited_seconds, 1)
        waited = timing.get("waited_for_pairs_seconds", 0)
        beside = "the rest of the pairs and the held-out ones" if first < count else "the held-out pairs"
        progress.done("training", timing["train_seconds"], f"distillation ({result['images']:,} images) beside {beside}"
                      + (f" (training waited {waited:.0f} s for pairs)" if waited >= 1 else ""))

        t0 = time.time()
        student_job = helper.submit(demo_jobs.student_rows, teacher_path, str(out / "run" / "student" / "unet"),
                                    eval_samples, cfg.pairs, cfg.adversarial.shift, cfg.seed, list(HELPER_STEPS))
        eval_pairs = held_out_pairs(adapter, eval_samples, cfg.pairs, progress=False)  # the helper's, on disk
        evaluation = MiniEvaluation(adapter, eval_pairs, metrics, cfg.adversarial.shift, seed=cfg.seed)
        rows = demo_jobs.score_student(evaluation, result["student"], list(MAIN_STEPS))
        rows.update(student_job.result())
        timing["eval_seconds"] = round(time.time() - t0, 1)
        progress.done("evaluation", timing["eval_seconds"], "evaluation")

    report: dict = {"teacher": teacher["teacher"], "teacher_one_step": teacher["teacher_one_step"],
                    "student": {str(k): rows[k]["scores"] for k in STEPS}}
    report["train"] = {"iterations": result["iterations"], "images": result["images"],
                       "seconds": result["seconds"]}
    report["eval_samples"] = len(eval_pairs)
    timing["total_seconds"] = round(time.time() - started, 1)
    report["timing"] = timing
    report["processes"] = processes
    report["config"] = config_lib.to_dict(cfg)

    # Pictures: the same prompts and x_T for every row (two per class).
    grid = [adapter.decode(eval_pairs.x0[per_class(evaluation.labels)]), adapter.decode(teacher["grid"])]
    grid += [adapter.decode(rows[k]["grid"]) for k in STEPS]
    labels = [f"teacher {adapter.sampler.steps} st", "teacher 1 st", *(f"student {k} st" for k in STEPS)]
    save_grid(out / "grid.png", grid, labels, scale=4)
    _plot(out, report)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _training_pairs(cfg: DistillConfig, adapter: MiniAdapter, helper: Helper | Inline,
                    teacher: str | None) -> GrowingPairs:
    """The preset's training pairs. The first `pairs.start_shards` shards (all of them when 0) are made by
    both processes (shard s by process s % 2) before training starts; the helper makes the others one by
    one while the student trains on those, each joining the epoch the loader's schedule gives it. The
    cache's index is written once every shard is in, so the next demo finds them all."""
    pc = cfg.pairs
    out = pair_dir(pc.dir, adapter, pc.count, pc.seed, pc.shard_size)
    drop_corrupt_shards(out)
    first = pc.start_shards or pc.shards
    n = helper.processes
    args = (pc.count, pc.seed, str(out), pc.shard_size, pc.batch_size)
    jobs = [helper.submit(demo_jobs.pair_shards, teacher, *args, [s for s in range(first) if s % n == i])
            for i in range(1, n)]
    demo_jobs.share_of_pairs(adapter, *args, [s for s in range(first) if s % n == 0], progress=True)
    for job in jobs:
        job.result()
    later = {s: helper.submit(demo_jobs.pair_shards, teacher, *args, [s]) for s in range(first, pc.shards)}

    def arrival(shard: int) -> Callable[[], Pairs]:
        return lambda: (later[shard].result() if shard in later else None, load_shard(out, shard))[1]

    return GrowingPairs([arrival(s) for s in range(pc.shards)], pc.count,
                        on_complete=lambda: write_index_file(out, pc.count, pc.seed, pc.shard_size, adapter))


def _plot(out: Path, report: dict) -> None:
    log = out / "run" / "log.jsonl"
    xs, ys = [], []
    for line in log.read_text().splitlines() if log.exists() else []:
        e = json.loads(line)
        if "eval" in e:
            xs.append(e["images"])
            ys.append(e["eval"]["fid"])
    if xs:
        plot_curves(out / "fid_curve.png", {"student, 1 step": (xs, ys)}, "training images",
                    "classifier-FID, log scale (eval_samples held-out)",
                    "Mini world: 1-step quality during distillation",
                    {"teacher (multi-step)": report["teacher"]["fid"]})


def _row(name: str, steps, m: dict) -> str:
    return (f"| {name} | {steps} | {m['fid']:.2f} | {m.get('fid_to_teacher', 0):.2f} | {m['accuracy']:.3f} | "
            f"{m['precision']:.3f} | {m['recall']:.3f} | {m['coverage']:.3f} |")


def _loss_line(cfg: dict) -> str:
    """What the student was trained with, from the run's config (docs/method.md sections 3-4)."""
    pool, adv = cfg.get("pool", {}), cfg.get("adversarial", {})
    heads = "a dynamic pool of heads" if pool.get("dynamic", True) else "a static discriminator (one head per slot)"
    weight = adv.get("regression_weight", 0)
    rows = "every step" if adv.get("regression_rows") == "all" else "the first step"
    until, budget = adv.get("regression_refine_until", 0), cfg.get("max_images", 0)
    if rows == "every step" and until and not (budget and budget <= until):  # the switch fell inside this run
        rows = f"every step for the first {until:,} training images, then the first step"
    extra = f" + {weight:g} x mean squared error to the teacher's sample from the same x_T ({rows})" if weight else ""
    return f"Student loss: the {adv.get('loss', 'hinge')} adversarial loss against {heads}{extra}."


def render_markdown(r: dict) -> str:
    t, t1, s = r["teacher"], r["teacher_one_step"], r["student"]
    n = r["eval_samples"]
    lines = [
        "# NitroFusion mini-world demo",
        "",
        f"Teacher: {t['sampler']}. Student: one set of weights, sampled with the shifted LCM scheduler. "
        f"Metrics on {n} held-out prompts and x_T (the same for every row). classifier-FID uses the "
        "project's Fashion-MNIST classifier features (not Inception); accuracy = the classifier agrees "
        "with the prompt's class; precision / recall / coverage: k-NN manifolds (k=3) in the same features "
        "against as many real test images (fidelity / diversity).",
        "",
        "| model | steps | classifier-FID to real | FID to teacher samples | prompt accuracy | precision | recall "
        "| coverage |",
        "|---|---|---|---|---|---|---|---|",
        _row("teacher", t["steps"], t),
        _row("teacher forced to 1 step", 1, t1),
        *(_row("NitroFusion student", k, s[k]) for k in s),
    ]
    tr, tm, cfg = r["train"], r["timing"], r.get("config", {})
    grew = cfg.get("pairs", {}).get("start_shards", 0)
    lines += ["", _loss_line(cfg)]
    beside = "the later training pairs and the held-out pairs" if grew else "the held-out pairs"
    lines += [
        "",
        f"Distillation: {tr['iterations']} optimiser steps, {tr['images']} images, {tr['seconds']:.0f} s of "
        f"training. Phases ({r.get('processes', 1)} process(es)): start-up {tm.get('startup_seconds', 0):.0f} s, "
        f"teacher pairs {tm['teacher_pairs_seconds']:.0f} s (cached after the first run), distillation beside "
        f"{beside} {tm.get('train_seconds', 0):.0f} s, evaluation {tm['eval_seconds']:.0f} s; whole "
        f"demo {tm['total_seconds']:.0f} s.",
        "",
        "![teacher vs student](grid.png)",
        "",
        "![classifier-FID during training](fid_curve.png)",
        "",
    ]
    return "\n".join(lines)
