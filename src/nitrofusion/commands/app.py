"""`nitrofusion app`: the live demo in a browser."""

from __future__ import annotations

from pathlib import Path

from ..errors import NitroFusionError


def _check_values(args) -> None:
    """What can be refused before gradio and the model load (seconds each): a bad size, a model that is not there."""
    from ..worlds.pipelines.hub import is_hub_id  # torch-free

    if args.size is not None and (args.size <= 0 or args.size % 8):
        raise NitroFusionError(f"--size must be a positive multiple of 8 (got {args.size})")
    if not Path(args.model).exists() and not is_hub_id(args.model):
        raise NitroFusionError(f"--model {args.model} does not exist; give a run folder, an exported folder, a UNet "
                               "file (with --base) or a Hugging Face Hub id")


def cmd_app(args) -> None:
    _check_values(args)
    from ..worlds.pipelines.hub import local_model

    local_model(args.model, "--model")  # a Hub id resolved (or refused offline) before gradio's seconds of import
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise NitroFusionError("the live demo needs gradio: pip install 'nitrofusion[app]'") from None
    from ..app.live import LIVE_SIZE, build_app, launch, make_generator
    from ..dtypes import parse_dtype

    fn, examples = make_generator(args.model, args.base, args.shift, args.device or "cpu", parse_dtype(args.dtype),
                                  fast=args.fast, vae=args.vae, vae_dtype=parse_dtype(args.vae_dtype, "--vae-dtype"),
                                  size=args.size or LIVE_SIZE)
    print(f"serving {args.model} on http://{args.host}:{args.port or 7860} (Ctrl-C stops)")
    launch(build_app(fn, examples), args.host, args.port)
