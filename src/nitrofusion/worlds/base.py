"""What a world (model family) provides: the training half (adapter, prompts) and the inference half (recognise
a model, generate, serve the live app, evaluate)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..data.pairs import Pairs, Prompts
from ..distill_config import DistillConfig
from ..errors import NitroFusionError

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ..method.adapter import ModelAdapter

# (prompt, steps, seed) -> image, the model loaded once; a guided student's also takes guidance=w and carries
# `.guidance` = (w_min, w_max, default w) for the app's slider
LiveGenerator = Callable[[str, int, int], Image.Image]
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
    guidance: float | None = None  # a guided student's guidance scale w (mini world; docs/method.md §10)

    def given(self) -> list[str]:
        """The options set away from their defaults, as CLI flags."""
        defaults = GenerateOptions()
        return [f"--{f.name.replace('_', '-')}" for f in fields(self)
                if getattr(self, f.name) != getattr(defaults, f.name)]


@dataclass
class ModelPlan:
    """What `--dry-run` learns of a run's networks from its folders' configs and file headers (no weight is read)."""

    teacher: str  # one line: what the teacher is
    parameters: int  # the teacher network's
    trainable: int  # the student's trainable parameters
    level_channels: list[int]  # E's feature levels, the pool's heads read them
    peak_bytes: int | None = None  # the memory model's predicted peak, where the world has one


def meta_unet(config: dict):
    """A diffusers UNet from its config.json on the meta device: shapes only, no memory, no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def unet_plan(teacher: str, folder: Path, cfg: DistillConfig, need_model: bool = False) -> tuple[ModelPlan, object]:
    """A UNet family's plan from its `unet` folder: parameters (from the weights' headers), the student's trainable
    share (all, or its LoRA adapters: counted on a meta-device UNet), E's levels; the meta UNet when one was built
    (a LoRA student, or `need_model`), else None."""
    import json

    from ..models.architectures import unet_level_channels
    from ..models.student import lora_parameter_count
    from ..models.weights import header_numel

    config = json.loads((folder / "config.json").read_text())
    unet = meta_unet(config) if need_model or cfg.student.kind == "lora" else None
    parameters = header_numel(folder)
    if parameters is None:  # weights in another format than safetensors: count the architecture
        unet = unet if unet is not None else meta_unet(config)
        parameters = sum(p.numel() for p in unet.parameters())
    trainable = lora_parameter_count(unet, cfg.student) if cfg.student.kind == "lora" else parameters
    return ModelPlan(teacher, parameters, trainable, unet_level_channels(config)), unet


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

    def check_teacher(self, cfg: DistillConfig) -> None:
        """The run's teacher from its folder's index and configs alone (no weight is read): a missing folder, a
        folder of another family or a missing part is one line before anything is created."""
        return None  # a world whose teacher needs no files (none yet) checks nothing

    def plan_model(self, cfg: DistillConfig) -> ModelPlan:
        """`distill --dry-run`: the teacher checked from its folder's configs and file headers, and what the run
        would build from it; a missing or wrong file is a one-line error."""
        raise NitroFusionError(f"--dry-run cannot plan a {self.name}-world run yet")

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

    def export_formats_for(self, model: str | Path) -> tuple[str, ...]:
        """What `export --format` writes for this one model (a world may offer a format to some of its models)."""
        return self.export_formats

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
