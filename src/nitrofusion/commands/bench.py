"""`nitrofusion bench`: training step, memory model and inference timings."""

from __future__ import annotations


def cmd_bench(args) -> None:
    from ..step_profile import format_profile, profile_step
    from ..worlds.sdxl.bench import format_table, run_bench, save

    if args.size == "mini":  # the mini world's step, part by part (no SDXL stages to time)
        result = profile_step("mini", args.device, args.overrides, steps=max(args.iters, 1), warmup=args.warmup)
        text = format_profile(result)
    elif args.inference:
        from ..dtypes import parse_dtype
        from ..worlds.sdxl.inference_bench import format_inference, run_inference_bench

        result = run_inference_bench(args.size, args.device, parse_dtype(args.dtype), iters=max(args.iters, 1),
                                     warmup=args.warmup)
        text = format_inference(result)
    elif args.memory:
        from ..worlds.sdxl.memory import format_memory, memory_model

        result = memory_model(overrides=args.overrides)
        text = format_memory(result)
    else:
        result = run_bench(args.size, args.device, args.overrides, iters=args.iters, warmup=args.warmup)
        result["profile"] = profile_step(args.size, args.device, args.overrides, steps=max(args.iters, 1),
                                         warmup=args.warmup)
        text = format_table(result) + "\n\n" + format_profile(result["profile"])
    print(text)
    if args.out:
        save(result, args.out)
        print(f"results: {args.out}")

