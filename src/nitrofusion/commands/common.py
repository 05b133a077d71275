"""What several commands share: the distil config from the command line, resume's rules, output folders."""

from __future__ import annotations

from pathlib import Path

from ..errors import NitroFusionError


def output_folder(out: str) -> Path:
    """An output folder may exist, but must not be a file (which the command would otherwise trip over later)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NitroFusionError(f"--out {path} is an existing file; give a folder path")
    return path


def distill_config(args, extra: list[str] | None = None):
    from .. import config as config_lib
    from ..distill_config import DistillConfig

    return config_lib.build(DistillConfig, "distill", args.preset or args.default_preset,
                            list(args.overrides) + (extra or []), args.config)


# Keys a resumed run may change: how long it trains and how it reports, never what it trains.
RESUMABLE_KEYS = ("max_images", "max_minutes", "checkpoint_every_images", "keep_checkpoints", "log_every_images",
                  "eval_every_images", "eval_samples", "threads")


def resumed_config(args, extra: list[str]):
    """`--resume` continues the run folder's own config.yaml; a preset, --config or --set may change only the
    RESUMABLE_KEYS, anything else is refused before a model loads (the saved config is left untouched)."""
    from .. import config as config_lib
    from ..distill_config import DistillConfig

    saved_path = Path(args.out) / "config.yaml"
    if not (args.resume and saved_path.is_file()):
        return distill_config(args, extra)
    saved = config_lib.load(DistillConfig, saved_path)
    if args.preset or args.config:
        wanted = distill_config(args, extra)
    else:
        wanted = config_lib.load(DistillConfig, saved_path, list(args.overrides) + extra)
    changed = [k for k in config_lib.differences(saved, wanted) if k not in RESUMABLE_KEYS]
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise NitroFusionError(f"{args.out} was trained with another config ({shown} differ); --resume continues "
                               f"the run's own config.yaml and may change only {', '.join(RESUMABLE_KEYS)}; "
                               "drop the other options or start a new --out")
    return wanted


def model_args(args) -> list[str]:
    """--teacher / --prompts are shorthands for the config keys teacher= / prompts.source=."""
    extra = [f"teacher={args.teacher}"] if getattr(args, "teacher", None) else []
    return extra + ([f"prompts.source={args.prompts}"] if getattr(args, "prompts", None) else [])


def asset_out(args, shipped: Path) -> Path:
    """Where `teacher` / `classifier` write: --out, or the package's shipped files only when asked in so many
    words (a newcomer's trial run must not overwrite what every other command measures with)."""
    if args.replace_shipped and args.out:
        raise NitroFusionError("give either --out DIR or --replace-shipped, not both")
    if args.replace_shipped:
        return shipped
    if not args.out:
        raise NitroFusionError(f"choose where to write: --out DIR (or --replace-shipped to overwrite {shipped})")
    return Path(args.out)

