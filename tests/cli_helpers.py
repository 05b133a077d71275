"""Helpers shared by test modules that drive `nitrofusion generate` through the CLI (export, SD3)."""

import numpy as np
from PIL import Image

from nitrofusion.cli import main

PROMPTS = ["a red cat", "a photo of a dog", "an astronaut riding a horse"]


def pngs(folder, n: int) -> list[np.ndarray]:
    """The first n images `generate` wrote to folder, as arrays."""
    return [np.asarray(Image.open(folder / f"{i:04d}.png")) for i in range(n)]


def generate(model, out, *extra, steps: int = 2, seed: int = 3) -> list[np.ndarray]:
    """`nitrofusion generate` of PROMPTS from model into out (extra: more CLI flags); its images."""
    argv = ["generate", "--model", str(model), "--steps", str(steps), "--seed", str(seed), "--out", str(out)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert main(argv + list(extra)) == 0
    return pngs(out, len(PROMPTS))
