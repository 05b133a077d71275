"""`nitrofusion presets`: every preset with its one-line description."""

from __future__ import annotations


def cmd_presets(args) -> None:
    from ..config import available_presets, preset_description

    for kind in ("distill", "teacher"):
        print(f"{kind} presets (--preset NAME):")
        for name in available_presets(kind):
            print(f"  {name:16} {preset_description(kind, name)}")

