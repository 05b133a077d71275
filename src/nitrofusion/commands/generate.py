"""`nitrofusion generate`: 1-4 step images from any model, through its world."""

from __future__ import annotations

from pathlib import Path

from ..errors import NitroFusionError
from .common import output_folder


def cmd_generate(args) -> None:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise NitroFusionError(f"prompt file not found: {path}")
        try:
            prompts += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise NitroFusionError(f"prompt file {path} is not UTF-8 text; give one prompt per line") from None
    if not prompts:
        raise NitroFusionError("no prompt given: use --prompt TEXT or --prompts FILE")
    from ..sampling.spec import (  # torch-free: answers before loading
        check_generate_values,
        check_guidance,
        check_seed,
        check_steps,
    )

    check_steps(args.steps)
    check_guidance(args.guidance)
    check_seed(args.seed, "--seed")
    check_generate_values(args.height, args.width, args.batch_size, args.num_per_prompt)
    output_folder(args.out)
    from ..dtypes import parse_dtype
    from ..worlds import GenerateOptions, world_of_model

    options = GenerateOptions(base=args.base, shift=args.shift, height=args.height, width=args.width,
                              batch_size=args.batch_size, num_per_prompt=args.num_per_prompt, device=args.device,
                              dtype=parse_dtype(args.dtype), fast=args.fast, vae=args.vae,
                              vae_dtype=parse_dtype(args.vae_dtype, "--vae-dtype"), guidance=args.guidance)
    paths = world_of_model(args.model).generate_to_folder(Path(args.model), prompts, args.steps, args.seed,
                                                          Path(args.out), options)
    print(f"wrote {len(paths)} image{'s' if len(paths) != 1 else ''} and a grid to {args.out}")

