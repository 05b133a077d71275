"""nitrofusion: NitroFusion dynamic adversarial distillation into 1-4 step generators."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the package must stay cheap for the CLI's --help.
    if name == "TimestepShiftLCMScheduler":
        from .sampling.scheduler import TimestepShiftLCMScheduler

        return TimestepShiftLCMScheduler
    if name == "TimestepShiftFlowScheduler":
        from .sampling.flow_scheduler import TimestepShiftFlowScheduler

        return TimestepShiftFlowScheduler
    if name == "load_pipeline":
        from .worlds.pipelines.pipeline import load_pipeline

        return load_pipeline
    if name == "SchedulerMixin":
        # An exported folder's model_index.json names the scheduler ["nitrofusion", "TimestepShiftLCMScheduler"];
        # diffusers' loader looks the component's base class up in that same library to pick its load method.
        from diffusers import SchedulerMixin

        return SchedulerMixin
    raise AttributeError(name)
