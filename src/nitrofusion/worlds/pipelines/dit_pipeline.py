"""The DiT families' (SD3 / SD3.5, FLUX.1) `load_pipeline`: their stock diffusers pipeline with the student transformer
and its 1-4 step TimestepShiftFlowScheduler. The model is a run, a student folder, an exported pipeline folder, or a
transformer weights file (with --base); a LoRA run or file is the base's transformer with the adapters on, as
diffusers' `load_lora_weights` puts them (the training-time student exactly). A family supplies how it reads its
scheduler, files and folders (sd3/pipeline.py, flux/pipeline.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ...errors import NitroFusionError, describe
from .dit_lora import DiTLora, apply_lora, lora_of
from .pipeline import ModelRef, need_base, own_memory, quiet_loading, resolve


def load_dit_pipeline(spec: DiTLora, model: str | Path, base: str | Path | None, shift: int | None,
                      device: str | torch.device, dtype: torch.dtype | None, merge_lora: bool, *,
                      scheduler: Callable[[ModelRef, int | None], object],
                      from_file: Callable[[ModelRef, torch.dtype], torch.nn.Module],
                      folder_of: Callable[[ModelRef], Path | None],
                      extra_parts: Callable[[Path], dict] = lambda folder: {}):
    """`merge_lora`: a plain transformer instead of adapters (a run's student/transformer, merged by the trainer; a
    LoRA file fused here), what the exports write. Returns the pipeline on `device` (`nitrofusion_resolution` set;
    the family adds its own attributes)."""
    import diffusers

    ref = resolve(model, base)  # a weights file of another family than its --base is refused there
    if ref.kind == "pipeline" and ref.base is not None:
        raise NitroFusionError(f"{ref.path} is a complete pipeline folder; --base applies to run and student "
                               "folders only")
    if ref.family is not None and ref.family is not spec.family:
        f = ref.family
        where = f"--base {ref.base}" if ref.base is not None else "it"
        raise NitroFusionError(f"{ref.path} holds {spec.family.article} {spec.name} transformer but {where} is "
                               f"{f.article} {f.label} pipeline ({f.pipeline}): give the {spec.name} pipeline it "
                               "belongs to")
    dtype = dtype or torch.float32
    parts = {"scheduler": scheduler(ref, shift)}
    folder = ref.path
    lora = lora_of(ref)
    if lora is not None and merge_lora and ref.kind != "file":
        lora = None  # the run's student/transformer holds the adapters merged
    if ref.kind != "pipeline":
        folder = need_base(ref, "a pipeline")
    if ref.kind != "pipeline" and lora is None:  # with a LoRA the base's own transformer loads, adapters go on after
        try:
            parts["transformer"] = (from_file(ref, dtype) if ref.kind == "file" else getattr(
                diffusers, spec.transformer_class).from_pretrained(folder_of(ref), dtype=dtype))
        except NitroFusionError:
            raise
        except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken folder
            raise NitroFusionError(f"cannot load the transformer in {folder_of(ref)} ({describe(e)})") from None
    try:
        with quiet_loading():
            pipe = spec.family.pipeline_class().from_pretrained(folder, dtype=dtype, **parts, **extra_parts(folder))
    except Exception as e:  # noqa: BLE001 - a broken folder surfaces as many exception types
        raise NitroFusionError(f"cannot load the {spec.name} pipeline in {folder} ({describe(e)})") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.nitrofusion_resolution = ref.resolution
    if torch.device(device).type == "cpu":  # moving to a GPU allocates afresh anyway
        own_memory(pipe)
    if lora is not None:
        apply_lora(spec, pipe, lora, folder, fuse=merge_lora)
    return pipe.to(device)
