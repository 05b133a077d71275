"""nitrofusion: NitroFusion dynamic adversarial distillation into 1-4 step generators."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the package must stay cheap for the CLI's --help.
    if name == "TimestepShiftLCMScheduler":
        from .schedulers import TimestepShiftLCMScheduler

        return TimestepShiftLCMScheduler
    raise AttributeError(name)
