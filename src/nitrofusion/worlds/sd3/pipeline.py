"""SD3 / SD3.5 inference in 1-4 steps from a NitroFusion model (docs/method.md §8), in a stock
`StableDiffusion3Pipeline` with the student transformer and `TimestepShiftFlowScheduler`, and its export as a
diffusers folder. A model is a run folder (the text encoders and VAE come from its teacher folder unless `base`),
a student folder (transformer/ + scheduler/) with `base`, an exported pipeline folder, or a transformer weights
file with `base` (diffusers keys, or the original layout that `export --format single-file` writes: export.py).
Generation is the UNet families' `generate_images` (worlds/sdxl/pipeline.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import NitroFusionError, describe
from ..pipelines.pipeline import (
    SHIFT_METADATA_KEY,
    ModelRef,
    generate_images,
    need_base,
    quiet_loading,
)
from ..pipelines.pipeline import load_scheduler as base_load_scheduler

SCHEDULER_ENTRY = ["nitrofusion", "TimestepShiftFlowScheduler"]
__all__ = ["export_diffusers", "generate_images", "load_pipeline"]  # generate_images: the shared one
OPTIONAL_TEXT = ("text_encoder_3", "tokenizer_3")  # T5: SD3's pipeline runs without it (zeros in its place)
MMDIT_PREFIX = "model.diffusion_model."  # the MMDiT's part of an original-layout single file (export.py)


def absent_text_parts(folder: Path) -> dict:
    """None for the T5 parts a folder lacks: SD3's pipeline accepts that, but only when told so."""
    index = json.loads((folder / "model_index.json").read_text())
    return {name: None for name in OPTIONAL_TEXT if not (index.get(name) or [None])[0]}


def read_transformer_state(path: Path) -> dict[str, torch.Tensor]:
    """An SD3 transformer's diffusers state dict from a weights file: diffusers keys (`transformer.`-prefixed or
    not), or the original layout (a bare MMDiT, or a single file whose model.diffusion_model.* part alone is read:
    its VAE and text encoders stay on disk), converted by diffusers' own converter."""
    from ...models.architectures import ORIGINAL_MMDIT_KEY
    from ...models.weights import read_weights

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        check_whole(path)

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            if any(k.startswith(ORIGINAL_MMDIT_KEY) for k in keys):
                state = {k: f.get_tensor(k) for k in keys if k.startswith(MMDIT_PREFIX)}
                return _from_original(state, path)
    state = read_weights(path)
    if any(k.startswith("joint_blocks.") for k in state):  # a bare original-layout MMDiT
        return _from_original(state, path)
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def _from_original(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    try:
        return convert_sd3_transformer_checkpoint_to_diffusers(state)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:  # the converter indexes the keys it expects
        raise NitroFusionError(f"{path} is not a complete original-layout SD3 transformer ({describe(e)})") from None


def check_whole(path: Path) -> None:
    """A cut-short .safetensors file (an interrupted download) is one line, not the reader's error."""
    from ...models.weights import safetensors_problem

    problem = safetensors_problem(path)
    if problem:
        raise NitroFusionError(f"cannot read transformer weights: {problem}; fetch or write the file again")


def transformer_from_file(ref: ModelRef, dtype: torch.dtype):
    """An SD3 transformer weights file (diffusers keys or the original layout) in the architecture of the base
    folder's transformer."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from ...models.weights import check_same_layout

    base = need_base(ref, "an SD3 transformer weights file")
    config = SD3Transformer2DModel.load_config(base / "transformer")
    state = read_transformer_state(ref.path)
    with init_empty_weights():
        model = SD3Transformer2DModel.from_config(config)
    check_same_layout(model.state_dict(), state, f"transformer weights {ref.path}", "the base's SD3 transformer")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return model.eval()


def file_shift(ref: ModelRef) -> int | None:
    """The shift in a .safetensors file's metadata (its header alone: a single file is gigabytes)."""
    if ref.kind != "file" or ref.path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    check_whole(ref.path)
    with safe_open(str(ref.path), "pt") as f:
        meta = f.metadata() or {}
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
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None, merge_lora: bool = False):
    """A stock StableDiffusion3Pipeline with the student transformer and its 1-4 step scheduler
    (pipelines/dit_pipeline.py); call it with guidance_scale=0 (no classifier-free guidance, docs/method.md §5), or
    use `generate_images`."""
    from ..pipelines.dit_pipeline import load_dit_pipeline
    from .lora import SD3_LORA

    return load_dit_pipeline(SD3_LORA, model, base, shift, device, dtype, merge_lora, scheduler=load_scheduler,
                             from_file=transformer_from_file, folder_of=transformer_folder,
                             extra_parts=absent_text_parts)

def export_diffusers(model: str | Path, out: str | Path, base: str | Path | None = None, shift: int | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """A complete StableDiffusion3Pipeline folder that stock diffusers loads once nitrofusion is imported."""
    from ...io import tensor_bytes
    from ..pipelines.export import staged_output

    out = Path(out)
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    pipe = load_pipeline(model, base=base, shift=shift, dtype=dtype, merge_lora=True)
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
