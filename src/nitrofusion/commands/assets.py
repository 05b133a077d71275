"""`nitrofusion teacher` / `classifier`: the mini world's shipped assets."""

from __future__ import annotations

from .common import asset_out


def cmd_teacher(args) -> None:
    from .. import config as config_lib
    from ..worlds.mini.config import TeacherTrainConfig

    cfg = config_lib.build(TeacherTrainConfig, "teacher", args.preset or args.default_preset, args.overrides,
                           args.config)
    from ..worlds.mini.teacher import ASSET_TEACHER, train_teacher

    out = asset_out(args, ASSET_TEACHER)
    info = train_teacher(cfg, out)
    print(f"teacher written to {out}: {info}")


def cmd_classifier(args) -> None:
    from ..worlds.mini.metrics import ASSET_DIR, train_classifier

    out = asset_out(args, ASSET_DIR)
    info = train_classifier(out, epochs=args.epochs)
    print(f"classifier and real-data statistics written to {out}: {info}")

