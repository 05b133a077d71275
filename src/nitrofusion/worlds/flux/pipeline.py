"""FLUX.1 inference in 1-4 steps from a NitroFusion model (docs/method.md §8, FLUX), in a stock `FluxPipeline` with the
student transformer and `TimestepShiftFlowScheduler`, and its export as a diffusers folder. A model is a run folder
(the text encoders and VAE come from its teacher folder unless `base`), a student folder (transformer/ + scheduler/)
with `base`, or an exported pipeline folder; transformer weights files are not read yet.

The student is called at the embedded guidance it was trained at (`flux.guidance`), which its scheduler config
carries under a private key (diffusers skips `_`-keys when it builds the scheduler, so stock diffusers loads it);
`generate_images` (the shared one, worlds/pipelines/pipeline.py) passes it as FluxPipeline's guidance_scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import NitroFusionError, describe
from ..pipelines.family import FLUX
from ..pipelines.pipeline import ModelRef, generate_images, need_base, quiet_loading, resolve
from ..pipelines.pipeline import load_scheduler as base_load_scheduler
from .config import GUIDANCE_KEY

SCHEDULER_ENTRY = ["nitrofusion", "TimestepShiftFlowScheduler"]
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale and flux.guidance's: a scheduler without the key
__all__ = ["export_diffusers", "generate_images", "load_pipeline"]  # generate_images: the shared one


def transformer_folder(ref: ModelRef) -> Path | None:
    return {"run": ref.path / "student" / "transformer", "student": ref.path / "transformer",
            "unet": ref.path}.get(ref.kind)


def no_shift(ref: ModelRef) -> int:
    raise NitroFusionError(f"{ref.path} has no TimestepShiftFlowScheduler; pass --shift S (the shift it was distilled "
                           "with)")


def load_scheduler(ref: ModelRef, shift: int | None):
    """The model's TimestepShiftFlowScheduler (re-shifted with `shift`), carrying the student's embedded guidance."""
    from ...sampling.flow_scheduler import TimestepShiftFlowScheduler, flow_student_scheduler

    sched = base_load_scheduler(ref, shift, TimestepShiftFlowScheduler, flow_student_scheduler, no_shift)
    if GUIDANCE_KEY not in sched.config:  # re-shifted (or made from the base's config): the guidance is the model's
        own = ref.scheduler_dir
        saved = json.loads((own / "scheduler_config.json").read_text()) if own is not None else {}
        sched.register_to_config(**{GUIDANCE_KEY: float(saved.get(GUIDANCE_KEY, DEFAULT_GUIDANCE))})
    return sched


def lora_of(ref: ModelRef) -> Path | None:
    """The LoRA file a LoRA run (or its student folder) puts on its base's transformer; None for any other model."""
    from ..pipelines.export import PEFT_LORA_FILE, trained_lora_dir

    folder = trained_lora_dir(ref)
    return folder / PEFT_LORA_FILE if folder is not None else None


def load_pipeline(model: str | Path, base: str | Path | None = None, shift: int | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None, merge_lora: bool = False):
    """A stock FluxPipeline with the student transformer and its 1-4 step scheduler; call it with guidance_scale =
    `pipe.nitrofusion_guidance` (the student's embedded guidance), or use `generate_images`. A LoRA run is the base's
    transformer with the adapters on, as diffusers' `load_lora_weights` puts them: the training-time student exactly.
    `merge_lora`: the run's student/transformer instead (the adapters merged by the trainer), what export writes."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    ref = resolve(model, base)
    if ref.kind == "file":
        raise NitroFusionError(f"{ref.path} is a weights file: FLUX transformer and LoRA files are not read yet; give "
                               "a run, a student folder with --base, or an exported FluxPipeline folder")
    if ref.kind == "pipeline" and ref.base is not None:
        raise NitroFusionError(f"{ref.path} is a complete pipeline folder; --base applies to run and student "
                               "folders only")
    if ref.family is not None and ref.family is not FLUX:
        f = ref.family
        where = f"--base {ref.base}" if ref.base is not None else "it"
        raise NitroFusionError(f"{ref.path} holds a FLUX transformer but {where} is {f.article} {f.label} pipeline "
                               f"({f.pipeline}): give the FLUX pipeline it belongs to")
    dtype = dtype or torch.float32
    parts = {"scheduler": load_scheduler(ref, shift)}
    folder = ref.path
    lora = None if merge_lora else lora_of(ref)
    if ref.kind != "pipeline":
        folder = need_base(ref, "a pipeline")
    if ref.kind != "pipeline" and lora is None:  # with a LoRA the base's own transformer loads, adapters go on after
        try:
            parts["transformer"] = FluxTransformer2DModel.from_pretrained(transformer_folder(ref), dtype=dtype)
        except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken folder
            where = transformer_folder(ref)
            raise NitroFusionError(f"cannot load the transformer in {where} ({describe(e)})") from None
    try:
        with quiet_loading():
            pipe = FluxPipeline.from_pretrained(folder, dtype=dtype, **parts)
    except Exception as e:  # noqa: BLE001 - a broken folder surfaces as many exception types
        raise NitroFusionError(f"cannot load the FLUX pipeline in {folder} ({describe(e)})") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.nitrofusion_resolution = ref.resolution or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.nitrofusion_size_multiple = pipe.vae_scale_factor * 2  # 2x2 latent packing
    pipe.nitrofusion_guidance = float(pipe.scheduler.config[GUIDANCE_KEY])
    if lora is not None:
        apply_lora(pipe, lora, folder)
    return pipe.to(device)


def apply_lora(pipe, path: Path, base: Path) -> None:
    """A LoRA run's adapters on the pipeline's transformer through diffusers' own FLUX loader (rank, alpha and targets
    from the file's metadata); every factor must find its layer."""
    from safetensors import safe_open

    from ...models.student import ADAPTER

    with safe_open(str(path), "pt") as f:
        wanted = sum(k.endswith(".lora_A.weight") for k in f.keys())  # noqa: SIM118 - a safe_open handle
    try:
        with quiet_loading(errors_only=True):
            pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    except Exception as e:  # noqa: BLE001 - diffusers and peft raise many types for a LoRA that does not fit
        raise NitroFusionError(f"cannot apply LoRA {path} to the FLUX transformer of {base} ({describe(e)})") from None
    applied = sum(1 for m in pipe.transformer.modules() if ADAPTER in getattr(m, "lora_A", {}))
    if applied != wanted:
        raise NitroFusionError(f"LoRA {path} does not fit the FLUX transformer of {base}: {wanted - applied} of its "
                               f"{wanted} layers have no place in it")


def export_diffusers(model: str | Path, out: str | Path, base: str | Path | None = None, shift: int | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """A complete FluxPipeline folder that stock diffusers loads once nitrofusion is imported (its scheduler is
    TimestepShiftFlowScheduler; sample it with guidance_scale = the scheduler config's `_nitrofusion_guidance`)."""
    from ...io import tensor_bytes
    from ..pipelines.export import staged_output

    out = Path(out)
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    pipe = load_pipeline(model, base=base, shift=shift, dtype=dtype, merge_lora=True)
    weights = sum(tensor_bytes(m.state_dict()) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    with staged_output(out, weights) as tmp, quiet_loading(errors_only=True):
        pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["scheduler"] = SCHEDULER_ENTRY
        index.pop("_name_or_path", None)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
