"""`nitrofusion ablate`: the paper's ablation on the mini world, with seeds."""

from __future__ import annotations

from pathlib import Path


def cmd_ablate(args) -> None:
    from ..studies.variants import PAPER, ablation_configs

    # every argument and config checked before the training stack loads (seconds)
    ablation_configs(args.variants or list(PAPER), args.seeds, args.seed_start, args.budget, args.eval_samples,
                     args.overrides, sorted(set(args.steps or [1])), args.probe_every)
    from ..studies.ablate import run_ablation

    r = run_ablation(Path(args.out), seeds=args.seeds, seed_start=args.seed_start, budget_images=args.budget,
                     eval_samples=args.eval_samples,
                     variants=args.variants, overrides=args.overrides, steps=args.steps,
                     probe_every=args.probe_every)
    print(f"ablation table: {Path(args.out) / 'ablation.md'} ({r['seconds']:.0f} s)")
