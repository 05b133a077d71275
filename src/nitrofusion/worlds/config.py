"""Each world's checks of a whole distill config, by world name: what belongs to other worlds, what it cannot
train yet. Torch-free: DistillConfig.validate runs them before any model library loads; the worlds' own config
modules hold them, and each World answers the same through `World.check_config`."""

from __future__ import annotations

from .flux.config import check_run as _flux
from .mini.config import check_run as _mini
from .sd.config import check_run as _sd
from .sd3.config import check_run as _sd3
from .sdxl.config import check_run as _sdxl

CHECKS = {"mini": _mini, "sdxl": _sdxl, "sd": _sd, "sd3": _sd3, "flux": _flux}


def check_config(cfg) -> None:
    CHECKS[cfg.world](cfg)
