"""`nitrofusion export` / `transfer`: diffusers, single-file and LoRA outputs."""

from __future__ import annotations


def cmd_export(args) -> None:
    from ..dtypes import parse_dtype
    from ..worlds.sdxl.export import export

    r = export(args.model, args.format, args.out, base=args.base, shift=args.shift, rank=args.rank,
               dtype=parse_dtype(args.dtype), device=args.device)
    if args.format == "lora" and "source" in r:
        print(f"LoRA rank {r['rank']} (alpha {r['alpha']:g}) on {r['lora_layers']} layers "
              f"({r['lora_parameters']:,} parameters): {r['source']}")
    elif args.format == "lora":
        print(f"LoRA rank {r['rank']} on {r['lora_layers']} Linear/Conv2d layers ({r['lora_parameters']:,} "
              f"parameters): relative error of the delta {r['relative_error_total']:.4f} overall, "
              f"{r['relative_error_covered']:.4f} on those layers; {100 * r['uncovered_fraction']:.2f}% of the "
              "delta (squared norm) is in norms/biases that LoRA cannot hold")
    elif args.format == "single-file":
        print(f"{r['tensors']} tensors in the original SDXL layout; round trip through diffusers' converters "
              f"exact for all {r['round_trip_checked']} tensors; sample with shift {r['shift']}, 1-4 steps, no CFG")
    print(f"exported to {args.out}")


def cmd_transfer(args) -> None:
    from ..dtypes import parse_dtype
    from ..worlds.sdxl.export import transfer

    r = transfer(args.student, args.base, args.custom, args.out, dtype=parse_dtype(args.dtype))
    print(f"custom + (student - base) over {r['tensors']} tensors written to {r['path']}"
          + (f" (sample with shift {r['shift']})" if r["shift"] is not None else ""))

