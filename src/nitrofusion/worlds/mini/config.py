"""The mini world's config sections (teacher UNet shape, teacher training); torch-free, so configs check fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...config import ranged
from ...errors import ConfigError
from ...sampling.spec import SamplerSpec

ASSET_TEACHER = Path(__file__).resolve().parent / "assets" / "teacher"  # the shipped teacher folder


TEACHER_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "teacher.yaml")


def find_student(root: Path) -> Path | None:
    """`root` or `root`/student when it holds a student (unet/ and scheduler/, as `distill` writes it), else None."""
    for folder in (root, root / "student"):
        if (folder / "unet" / "config.json").is_file() and (folder / "scheduler" / "scheduler_config.json").is_file():
            return folder
    return None


def few_step_folder(root: Path) -> Path | None:
    """The student folder when `root` is a `distill` run (or its student/): a few-step model as the teacher, as
    DMD2's 4-step UNet is in sdxl-realism (docs/method.md §1); None for a teacher folder."""
    return None if (root / "teacher.yaml").is_file() else find_student(root)


def missing_teacher_file(root: Path) -> Path | None:
    """The first file a teacher folder lacks (None: complete); a run's student/ counts as a teacher."""
    student = few_step_folder(root)
    if student is not None:
        need = [student / "unet" / "diffusion_pytorch_model.safetensors"]
    else:
        need = [root / name for name in TEACHER_FILES]
    return next((p for p in need if not p.is_file()), None)


@dataclass
class MiniUNetConfig:
    resolution: int = ranged(16, ge=8, le=1024)
    block_out_channels: list[int] = ranged(factory=lambda: [32, 64, 64], ge=1)
    layers_per_block: int = ranged(2, ge=1)
    attention_head_dim: int = ranged(8, ge=1)
    norm_num_groups: int = ranged(16, ge=1)

    def validate(self) -> None:
        from ...errors import ConfigError

        if len(self.block_out_channels) != 3:
            raise ConfigError("model.block_out_channels: the mini UNet has exactly 3 blocks (SDXL's layout)")
        if self.resolution % 4:
            raise ConfigError("model.resolution must be a multiple of 4 (two downsamplers)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError("model.norm_num_groups must divide every entry of model.block_out_channels")


@dataclass
class TeacherTrainConfig:
    model: MiniUNetConfig = field(default_factory=MiniUNetConfig)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    batch_size: int = ranged(64, ge=1)
    lr: float = ranged(3e-4, gt=0, le=1)
    warmup_iterations: int = ranged(200, ge=0)
    ema_decay: float = ranged(0.999, ge=0, lt=1)
    caption_dropout: float = ranged(0.1, ge=0, lt=1)
    minutes: float = ranged(40.0, ge=0)
    max_iterations: int = ranged(0, ge=0)  # 0 = limited by minutes only
    seed: int = ranged(0, ge=0, le=2**31 - 1)
    threads: int = ranged(0, ge=0, le=1024)  # 0 = automatic: usable cores less one (threads.py)

    def validate(self) -> None:
        if self.minutes <= 0 and self.max_iterations <= 0:
            raise ConfigError("set minutes > 0 or max_iterations > 0")


def check_run(cfg) -> None:
    """A distill config of world `mini` (DistillConfig.validate): no keys of the pipeline worlds."""
    if cfg.prompts.source or any(getattr(cfg, s).teacher_unet or getattr(cfg, s).teacher_lora for s in ("sdxl", "sd")):
        raise ConfigError("prompts.*, sdxl.* and sd.* apply to the pipeline worlds; the mini world's prompts are its "
                          "10 classes")
    if cfg.student.guidance and cfg.real.source != "teacher":
        raise ConfigError("student.guidance needs every row to be a teacher pair made at its own w (a real image "
                          "has none): set real.source=teacher, or student.guidance=[]")
    if cfg.student.guidance and cfg.teacher and few_step_folder(Path(cfg.teacher)) is not None:
        raise ConfigError(f"student.guidance needs a teacher with classifier-free guidance; {cfg.teacher} is a "
                          "few-step teacher (distilled without it): leave teacher empty or give a teacher folder")
    if cfg.real.source != "teacher" and cfg.real.data:
        raise ConfigError("real.data applies to the pipeline worlds (sdxl, sd, sd3); the mini world's real images are "
                          "Fashion-MNIST's train split (leave real.data empty)")
