"""`nitrofusion ablate` end to end at a toy budget: every variant x seed trains, is scored, lands in the
table and plot; a rerun skips finished runs."""

import json

import pytest
from signals import signalled_on_call

from nitrofusion import preemption
from nitrofusion.errors import NitroFusionError
from nitrofusion.studies.ablate import PAPER, run_ablation, summarise


def test_summary_statistics_and_deltas():
    runs = [{"variant": v, "seed": s, "fid": f, "fid_to_teacher": f + 1, "accuracy": 0.9}
            for v, fs in (("full", [1.0, 2.0, 3.0]), ("static", [3.0, 4.0, 5.0])) for s, f in enumerate(fs)]
    s = summarise(runs, ["full", "static"])
    assert s["full"]["fid"] == {"mean": 2.0, "std": 1.0, "delta_vs_full": 0.0, "delta_in_seed_std": 0.0}
    assert s["static"]["fid"]["delta_vs_full"] == 2.0 and s["static"]["fid"]["delta_in_seed_std"] == 2.0
    assert s["static"]["accuracy"]["delta_in_seed_std"] is None  # no spread: no ratio


def test_every_variant_is_a_valid_config_that_differs_from_full():
    from nitrofusion import config as config_lib
    from nitrofusion.distill_config import DistillConfig
    from nitrofusion.studies.ablate import VARIANTS

    built = {v: config_lib.build(DistillConfig, "distill", preset, list(sets)) for v, (preset, sets, _) in
             VARIANTS.items()}
    # multistep-p0.25 became the mini default (so `full`); it stays by name for the study's records
    assert {v for v in VARIANTS if v != "full" and built[v] == built["full"]} == {"multistep-p0.25"}
    static, refreshed = built["static"], built["static-refresh"]  # the refresh's effect alone, at k = 1
    assert refreshed.pool.refresh_fraction == 0.01 and static.pool.refresh_fraction == 0
    assert refreshed.heads_optim == static.heads_optim and refreshed.pool.heads_per_slot == 1
    # the preset README reports as the best one-step student is exactly the measured `static` + p = 0
    assert config_lib.build(DistillConfig, "distill", "mini-static-1step", []) == config_lib.build(
        DistillConfig, "distill", "mini-static", ["multistep.p=0"])


@pytest.mark.slow
def test_ablate_runs_every_variant_and_skips_finished_runs(tmp_path, monkeypatch):
    import nitrofusion.studies.ablate as ablate

    sets = ["pairs.count=64", "pairs.shard_size=32", "micro_batch=8", "pool.width=8", "pool.heads_per_slot=2"]
    messages = []
    real_distill = ablate.distill
    monkeypatch.setattr(ablate, "distill", signalled_on_call(real_distill, 3))  # SIGTERM as the third run starts
    with preemption.stop_on_signals(), pytest.raises(preemption.Preempted, match="after step 1 "):
        run_ablation(tmp_path, seeds=2, budget_images=16, eval_samples=20, overrides=sets, progress=False,
                     log=messages.append)
    monkeypatch.setattr(ablate, "distill", real_distill)
    r = run_ablation(tmp_path, seeds=2, budget_images=16, eval_samples=20, overrides=sets, progress=False,
                     log=messages.append)
    assert sum("skipped" in m for m in messages) == 2 and sum("resuming" in m for m in messages) == 1
    assert set(r["summary"]["1"]) == set(PAPER) and all(s["n"] == 2 for s in r["summary"]["1"].values())
    assert len(r["runs"]) == 10 and all(run["images"] == 16 for run in r["runs"])
    assert (tmp_path / "ablation.png").stat().st_size > 0 and "| single-head" in (tmp_path / "ablation.md").read_text()
    pools = {v: json.loads((tmp_path / "runs" / f"{v}-seed0" / "result.json").read_text()) for v in PAPER}
    assert len({p["fid"] for p in pools.values()}) > 1  # the variants really differ
    assert all(0 <= p["precision"] <= 1 and 0 <= p["recall"] <= 1 for p in pools.values())

    monkeypatch.setattr(ablate, "distill", lambda *a, **k: pytest.fail("a finished run was retrained"))
    again = run_ablation(tmp_path, seeds=2, budget_images=16, eval_samples=20, overrides=sets, progress=False,
                         log=messages.append)
    assert again["summary"] == r["summary"] and sum("skipped" in m for m in messages) == 12
    # a step count a finished run lacks is scored from its saved student, without retraining
    more = run_ablation(tmp_path, seeds=2, budget_images=16, eval_samples=20, overrides=sets, steps=[1, 4],
                        variants=["full"], progress=False, log=messages.append)
    assert more["summary"]["1"]["full"] == r["summary"]["1"]["full"] and more["summary"]["4"]["full"]["n"] == 2
    # a slice of the seeds (--seed-start): seed 1 alone is the finished seed-1 run, skipped
    part = run_ablation(tmp_path, seeds=1, seed_start=1, budget_images=16, eval_samples=20, overrides=sets,
                        variants=["full"], progress=False, log=messages.append)
    assert [(x["variant"], x["seed"]) for x in part["runs"]] == [("full", 1)]
    with pytest.raises(NitroFusionError, match="--seed-start >= 0"):
        run_ablation(tmp_path, seeds=1, seed_start=-1, progress=False)
