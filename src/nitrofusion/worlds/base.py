"""What a world (model family) provides: the training half (adapter, prompts) and the inference half (recognise
a model, generate, serve the live app, evaluate)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from PIL import Image

from ..data.pairs import Pairs, Prompts
from ..distill_config import DistillConfig
from ..errors import NitroFusionError
from ..method.adapter import ModelAdapter

LiveGenerator = Callable[[str, int, int], Image.Image]  # (prompt, steps, seed) -> image, the model loaded once
Evaluator = Callable[[torch.nn.Module, int], dict]  # (student, step) -> numbers for log.jsonl (training/loop.py)


@dataclass
class GenerateOptions:
    """Inference options; a world refuses in one line the ones that do not apply to its models."""

    base: str | None = None  # a pipeline folder with the text encoders, tokenizers and VAE
    shift: int | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 4
    num_per_prompt: int = 1
    device: str | None = None
    dtype: torch.dtype | None = None
    fast: bool = False
    vae: str | None = None
    vae_dtype: torch.dtype | None = None

    def given(self) -> list[str]:
        """The options set away from their defaults, as CLI flags."""
        defaults = GenerateOptions()
        return [f"--{f.name.replace('_', '-')}" for f in fields(self)
                if getattr(self, f.name) != getattr(defaults, f.name)]


class World(ABC):
    name: str
    supported_options: tuple[str, ...] = ()  # GenerateOptions flags its models take besides the common ones
    export_formats: tuple[str, ...] = ()  # what `export --format` writes for its models
    common_options = ("--num-per-prompt", "--batch-size", "--device")

    # training half
    @abstractmethod
    def adapter(self, cfg: DistillConfig) -> ModelAdapter:
        """The teacher, backbone and encoders of a run (method/adapter.py)."""

    @abstractmethod
    def prompts(self, cfg: DistillConfig, verbose: bool = True) -> Prompts:
        """The run's prompt source; an unusable source fails here, before any model loads."""

    def check_config(self, cfg: DistillConfig) -> None:
        """This world's checks of a distill config (torch-free: DistillConfig.validate runs them first)."""
        from .config import CHECKS

        CHECKS[self.name](cfg)

    @abstractmethod
    def real_pairs(self, cfg: DistillConfig, adapter: ModelAdapter, progress: bool = True) -> Pairs:
        """Real images with their prompts as pair rows (x_T, x0, prompt), for `real.source` data and mix."""

    def training_evaluator(self, cfg: DistillConfig, adapter: ModelAdapter) -> Evaluator | None:
        """What `eval_every_images` runs during `distill`; None where the world has no cheap metric."""
        return None

    # inference half
    @abstractmethod
    def recognises(self, kind: str, path: Path) -> bool:
        """Whether a model folder/file of `kind` (pipeline.model_kind; runs say their world in config.yaml) is
        one of this world's."""

    @abstractmethod
    def generate_to_folder(self, model: Path, prompts: list[str], steps: int, seed: int, out: Path,
                           options: GenerateOptions) -> list[Path]:
        """PNGs (image i seeded seed + i) and a grid in `out`."""

    @abstractmethod
    def live_generator(self, model: Path, options: GenerateOptions, size: int | None) -> tuple[LiveGenerator,
                                                                                               list[str]]:
        """The app's generate function (the model loads here, once) and example prompts."""

    @abstractmethod
    def evaluate(self, model: str, steps: list[int], out: Path, options: dict) -> list[str]:
        """The world's default evaluation of `model` at each step count, written to `out`; the lines to print."""

    def export(self, model: str, fmt: str, out: str, options: dict) -> list[str]:
        """Write `model` as a diffusers folder, a single file or a LoRA; the lines to print."""
        raise NitroFusionError(f"export writes diffusers, single-file and LoRA formats of SDXL-family models; {model} "
                               f"is a {self.name}-world model (its run folder's student/ is already a diffusers UNet)")

    def transfer(self, student: str, base: str, custom: str, out: str, options: dict) -> list[str]:
        """custom + (student - base) (docs/method.md §6); the lines to print."""
        raise NitroFusionError(f"transfer applies to SDXL-family UNets; {student} is a {self.name}-world model")

    def bench(self, options: dict) -> tuple[dict, str]:
        """`nitrofusion bench` for this world: (results for --out, the table to print)."""
        raise NitroFusionError(f"no bench for the {self.name} world")

    def check_options(self, model: Path | str, options: GenerateOptions) -> None:
        unsupported = [f for f in options.given() if f not in self.supported_options + self.common_options]
        if unsupported:
            one = len(unsupported) == 1
            raise NitroFusionError(f"{', '.join(unsupported)} {'does' if one else 'do'} not apply to {model}, a "
                                   f"{self.name}-world model; drop {'it' if one else 'them'}")
