"""Why is 2-4 step refinement not better than 1 step? Score finished mini runs at 1-4 steps under
alternatives that need no retraining: the EMA weights (what `student/` holds) vs the raw weights of the
last checkpoint, and the released re-noising rule vs re-noising to the SHIFTED timestep.

    python scripts/refinement_diagnostics.py --runs ablation-out/runs/full-seed* --out diag.json

Prints a table of mean +- std over the runs (classifier-FID to real, prompt accuracy, recall).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from nitrofusion.distill_config import PairsConfig
from nitrofusion.training import checkpoint as ckpt
from nitrofusion.worlds.mini.adapter import MiniAdapter
from nitrofusion.worlds.mini.evaluation import MiniEvaluation
from nitrofusion.worlds.mini.generate import load_mini_student
from nitrofusion.worlds.mini.metrics import MiniMetrics
from nitrofusion.worlds.mini.pairsets import held_out_pairs
from nitrofusion.worlds.mini.teacher import load_teacher

SETTINGS = (("ema", "unshifted"), ("raw", "unshifted"), ("ema", "shifted"))


def raw_student(run: Path, ema_student: torch.nn.Module) -> torch.nn.Module:
    tensors, _, _ = ckpt.load(ckpt.latest(run))
    model = copy.deepcopy(ema_student)
    model.load_state_dict(tensors["student"])
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="mini run folders (with student/ and checkpoints/)")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--out", default="refinement-diagnostics.json")
    args = ap.parse_args()
    adapter = MiniAdapter(load_teacher())
    pairs = held_out_pairs(adapter, args.samples, PairsConfig())
    metrics = MiniMetrics()
    rows: dict[str, list[dict]] = {}
    for run in map(Path, args.runs):
        _, ema, shift = load_mini_student(run)
        models = {"ema": ema, "raw": raw_student(run, ema)}
        evaluation = MiniEvaluation(adapter, pairs, metrics, shift, seed=0)
        for weights, renoise in SETTINGS:
            for steps in (1, 2, 3, 4):
                score = evaluation.score(evaluation.student_images(models[weights], steps, renoise=renoise))
                rows.setdefault(f"{weights}/{renoise}/{steps}", []).append(score)
                print(f"{run.name} {weights} {renoise} {steps}: FID {score['fid']:.2f} acc {score['accuracy']:.3f}",
                      flush=True)
    Path(args.out).write_text(json.dumps({"runs": args.runs, "samples": args.samples, "rows": rows}, indent=1))
    print("| weights | re-noising | steps | classifier-FID | accuracy | recall |\n|---|---|---|---|---|---|")
    for key, scores in rows.items():
        cells = []
        for m in ("fid", "accuracy", "recall"):
            xs = [s[m] for s in scores]
            mean = sum(xs) / len(xs)
            sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1))
            cells.append(f"{mean:.3f} +- {sd:.3f}")
        print(f"| {' | '.join(key.split('/'))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
