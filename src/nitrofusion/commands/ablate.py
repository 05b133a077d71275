"""`nitrofusion ablate`: the paper's ablation on the mini world, with seeds."""

from __future__ import annotations

from pathlib import Path


def cmd_ablate(args) -> None:
    from ..studies.ablate import run_ablation

    r = run_ablation(Path(args.out), seeds=args.seeds, seed_start=args.seed_start, budget_images=args.budget,
                     eval_samples=args.eval_samples,
                     variants=args.variants, overrides=args.overrides, steps=args.steps)
    print(f"ablation table: {Path(args.out) / 'ablation.md'} ({r['seconds']:.0f} s)")

