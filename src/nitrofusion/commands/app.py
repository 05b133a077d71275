"""`nitrofusion app`: the live demo in a browser."""

from __future__ import annotations

from ..errors import NitroFusionError


def cmd_app(args) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise NitroFusionError("the live demo needs gradio: pip install 'nitrofusion[app]'") from None
    from ..app.live import LIVE_SIZE, build_app, launch, make_generator
    from ..dtypes import parse_dtype

    if args.size is not None and (args.size <= 0 or args.size % 8):
        raise NitroFusionError(f"--size must be a positive multiple of 8 (got {args.size})")
    fn, examples = make_generator(args.model, args.base, args.shift, args.device or "cpu", parse_dtype(args.dtype),
                                  fast=args.fast, vae=args.vae, vae_dtype=parse_dtype(args.vae_dtype, "--vae-dtype"),
                                  size=args.size or LIVE_SIZE)
    print(f"serving {args.model} on http://{args.host}:{args.port or 7860} (Ctrl-C stops)")
    launch(build_app(fn, examples), args.host, args.port)

