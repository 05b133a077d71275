"""What the method changes with training progress, as pure functions of (config, training images seen): a resumed run
computes the same values from the images it has done, so it stays exact."""

from __future__ import annotations

from .config import AdversarialConfig, MultiStepConfig


def refine_probability(multistep: MultiStepConfig, images: int) -> float:
    """The multi-step stage (docs/method.md §5.1): one-step training only until `start_images`, then a sample trains
    a refinement step with probability `p`."""
    return multistep.p if images >= multistep.start_images else 0.0


def regression_on_refinements(adversarial: AdversarialConfig, images: int) -> bool:
    """With regression_rows all [ours]: whether the refinement rows still get the regression term (for the first
    `regression_refine_until` images; 0: the whole run)."""
    until = adversarial.regression_refine_until
    return not until or images < until
