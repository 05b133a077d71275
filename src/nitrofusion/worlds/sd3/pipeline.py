"""SD3 / SD3.5 inference in 1-4 steps from a NitroFusion model (docs/method.md §8), in a stock
`StableDiffusion3Pipeline` with the student transformer and `TimestepShiftFlowScheduler`, and its export as a
diffusers folder. A model is a run folder (the text encoders and VAE come from its teacher folder unless `base`),
a student folder (transformer/ + scheduler/) with `base`, an exported pipeline folder, or a transformer weights
file with `base`. Generation is the UNet families' `generate_images` (worlds/sdxl/pipeline.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import NitroFusionError, describe
from ..pipelines.pipeline import SHIFT_METADATA_KEY, ModelRef, generate_images, need_base, quiet_loading, resolve
from ..pipelines.pipeline import load_scheduler as base_load_scheduler

SCHEDULER_ENTRY = ["nitrofusion", "TimestepShiftFlowScheduler"]
__all__ = ["export_diffusers", "generate_images", "load_pipeline"]  # generate_images: the shared one
OPTIONAL_TEXT = ("text_encoder_3", "tokenizer_3")  # T5: SD3's pipeline runs without it (zeros in its place)


def absent_text_parts(folder: Path) -> dict:
    """None for the T5 parts a folder lacks: SD3's pipeline accepts that, but only when told so."""
    index = json.loads((folder / "model_index.json").read_text())
    return {name: None for name in OPTIONAL_TEXT if not (index.get(name) or [None])[0]}


def transformer_from_file(ref: ModelRef, dtype: torch.dtype):
    """An SD3 transformer weights file (diffusers keys) in the architecture of the base folder's transformer."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from ...models.weights import check_same_layout, read_weights

    base = need_base(ref, "an SD3 transformer weights file")
    config = SD3Transformer2DModel.load_config(base / "transformer")
    state = {k.removeprefix("transformer."): v for k, v in read_weights(ref.path).items()}
    with init_empty_weights():
        model = SD3Transformer2DModel.from_config(config)
    check_same_layout(model.state_dict(), state, f"transformer weights {ref.path}", "the base's SD3 transformer")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return model.eval()


def file_shift(ref: ModelRef) -> int | None:
    from ...models.weights import read_weights_file

    meta = read_weights_file(ref.path)[1] if ref.kind == "file" else {}
    return int(meta[SHIFT_METADATA_KEY]) if SHIFT_METADATA_KEY in meta else None


def transformer_folder(ref: ModelRef) -> Path | None:
    return {"run": ref.path / "student" / "transformer", "student": ref.path / "transformer",
            "unet": ref.path}.get(ref.kind)


def file_or_given_shift(ref: ModelRef) -> int:
    shift = file_shift(ref)
    if shift is None:
        raise NitroFusionError(f"{ref.path} has no TimestepShiftFlowScheduler; pass --shift S (the shift it was "
                               "distilled with)")
    return shift


def load_scheduler(ref: ModelRef, shift: int | None):
    from ...sampling.flow_scheduler import TimestepShiftFlowScheduler, flow_student_scheduler

    return base_load_scheduler(ref, shift, TimestepShiftFlowScheduler, flow_student_scheduler, file_or_given_shift)


def load_pipeline(model: str | Path, base: str | Path | None = None, shift: int | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A stock StableDiffusion3Pipeline with the student transformer and its 1-4 step scheduler; call it with
    guidance_scale=0 (no classifier-free guidance, docs/method.md §5), or use `generate_images`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    ref = resolve(model, base)
    if ref.kind == "pipeline" and ref.base is not None:
        raise NitroFusionError(f"{ref.path} is a complete pipeline folder; --base applies to run and student "
                               "folders only")
    dtype = dtype or torch.float32
    parts = {"scheduler": load_scheduler(ref, shift)}
    folder = ref.path
    if ref.kind != "pipeline":
        folder = need_base(ref, "a pipeline")
        try:
            parts["transformer"] = (transformer_from_file(ref, dtype) if ref.kind == "file" else
                                    SD3Transformer2DModel.from_pretrained(transformer_folder(ref), dtype=dtype))
        except NitroFusionError:
            raise
        except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken folder
            where = transformer_folder(ref)
            raise NitroFusionError(f"cannot load the transformer in {where} ({describe(e)})") from None
    try:
        with quiet_loading():
            pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype, **parts,
                                                            **absent_text_parts(folder))
    except Exception as e:  # noqa: BLE001 - a broken folder surfaces as many exception types
        raise NitroFusionError(f"cannot load the SD3 pipeline in {folder} ({describe(e)})") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.nitrofusion_resolution = ref.resolution
    return pipe.to(device)


def export_diffusers(model: str | Path, out: str | Path, base: str | Path | None = None, shift: int | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """A complete StableDiffusion3Pipeline folder that stock diffusers loads once nitrofusion is imported."""
    from ...io import tensor_bytes
    from ..pipelines.export import staged_output

    out = Path(out)
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    pipe = load_pipeline(model, base=base, shift=shift, dtype=dtype)
    size = pipe.nitrofusion_resolution
    if size and size != pipe.transformer.config.sample_size * pipe.vae_scale_factor:
        pipe.transformer.register_to_config(sample_size=size // pipe.vae_scale_factor)  # the pipeline's default
    weights = sum(tensor_bytes(m.state_dict()) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    with staged_output(out, weights) as tmp, quiet_loading(errors_only=True):
        pipe.save_pretrained(tmp, safe_serialization=True)  # without T5 it logs that None "cannot be saved"
        index = json.loads((tmp / "model_index.json").read_text())
        index["scheduler"] = SCHEDULER_ENTRY
        for name in OPTIONAL_TEXT:
            index.setdefault(name, [None, None])
        index.pop("_name_or_path", None)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
