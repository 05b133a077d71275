"""FLUX.1 inference in 1-4 steps from a NitroFusion model (docs/method.md §8, FLUX), in a stock `FluxPipeline` with the
student transformer and `TimestepShiftFlowScheduler`, and its export as a diffusers folder. A model is a run folder
(the text encoders and VAE come from its teacher folder unless `base`), a student folder (transformer/ + scheduler/)
with `base`, an exported pipeline folder, or a weights file with `base`: a transformer in the BFL layout that
`export --format single-file` writes (export.py) or under diffusers keys, or a FLUX LoRA file (`export --format lora`,
lora.py); a file's shift and guidance come from its metadata.

The student is called at the embedded guidance it was trained at (`flux.guidance`), which its scheduler config
carries under a private key (diffusers skips `_`-keys when it builds the scheduler, so stock diffusers loads it);
`generate_images` (the shared one, worlds/pipelines/pipeline.py) passes it as FluxPipeline's guidance_scale.
"""

from __future__ import annotations

import json
import types
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
from .config import GUIDANCE_KEY

SCHEDULER_ENTRY = ["nitrofusion", "TimestepShiftFlowScheduler"]
GUIDANCE_METADATA_KEY = "nitrofusion.guidance"  # a weights file's embedded guidance (export.py writes it)
FLUX_DEV_WIDTH = 3072  # FLUX.1's inner width, which diffusers' BFL -> diffusers converter assumes
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale and flux.guidance's: a scheduler without the key
__all__ = ["export_diffusers", "generate_images", "load_pipeline"]  # generate_images: the shared one


def transformer_folder(ref: ModelRef) -> Path | None:
    return {"run": ref.path / "student" / "transformer", "student": ref.path / "transformer",
            "unet": ref.path}.get(ref.kind)


def file_metadata(ref: ModelRef) -> dict:
    """A .safetensors weights file's metadata (its header alone); empty for anything else."""
    if ref.kind != "file" or ref.path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    from ...models.weights import safetensors_problem

    problem = safetensors_problem(ref.path)
    if problem:
        raise NitroFusionError(f"cannot read FLUX weights: {problem}; fetch or write the file again")
    with safe_open(str(ref.path), "pt") as f:
        return f.metadata() or {}


def no_shift(ref: ModelRef) -> int:
    shift = file_metadata(ref).get(SHIFT_METADATA_KEY)
    if shift is not None:
        return int(shift)
    raise NitroFusionError(f"{ref.path} has no TimestepShiftFlowScheduler; pass --shift S (the shift it was distilled "
                           "with)")


def load_scheduler(ref: ModelRef, shift: int | None):
    """The model's TimestepShiftFlowScheduler (re-shifted with `shift`), carrying the student's embedded guidance."""
    from ...sampling.flow_scheduler import TimestepShiftFlowScheduler, flow_student_scheduler

    sched = base_load_scheduler(ref, shift, TimestepShiftFlowScheduler, flow_student_scheduler, no_shift)
    if GUIDANCE_KEY not in sched.config:  # re-shifted (or made from the base's config): the guidance is the model's
        own = ref.scheduler_dir
        saved = json.loads((own / "scheduler_config.json").read_text()) if own is not None else {}
        guidance = saved.get(GUIDANCE_KEY, file_metadata(ref).get(GUIDANCE_METADATA_KEY, DEFAULT_GUIDANCE))
        sched.register_to_config(**{GUIDANCE_KEY: float(guidance)})
    return sched


def diffusers_converter(width: int):
    """diffusers' BFL -> diffusers FLUX converter for a transformer of inner width `width`: diffusers' own function
    for FLUX.1's 3072; for another width the same code with that constant (the single blocks' linear1 split) set to
    `width` (FLUX.1's mlp ratio 4 stays, as FluxTransformer2DModel has it)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    code = convert.__code__
    if width == FLUX_DEV_WIDTH or FLUX_DEV_WIDTH not in code.co_consts:  # a later diffusers may read it from the keys
        return convert
    consts = tuple(width if c == FLUX_DEV_WIDTH and type(c) is int else c for c in code.co_consts)
    return types.FunctionType(code.replace(co_consts=consts), convert.__globals__, convert.__name__,
                              convert.__defaults__, convert.__closure__)


def bfl_to_diffusers(state: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """A BFL-layout FLUX transformer (bare or under model.diffusion_model.) as diffusers' converter gives it back."""
    return diffusers_converter(width)(dict(state))


def is_bfl(keys) -> bool:
    return any(k.removeprefix("model.diffusion_model.").startswith(("double_blocks.", "single_blocks."))
               for k in keys)


def read_transformer_state(path: Path, width: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(a FLUX transformer's diffusers state dict, the file's metadata) from a weights file: the BFL layout (what
    single-file export writes, flux1-dev.safetensors, or ComfyUI's model.diffusion_model.-prefixed save; only the
    transformer's keys are read), converted by diffusers' converter at the base's `width`, or diffusers keys
    (`transformer.`-prefixed or not)."""
    from ...models.weights import read_weights_file, safetensors_problem

    problem = safetensors_problem(path) if path.suffix == ".safetensors" else None
    if problem:
        raise NitroFusionError(f"cannot read transformer weights: {problem}; fetch or write the file again")
    state, meta = read_weights_file(path)
    if is_bfl(state):
        state = {k: v for k, v in state.items() if not k.startswith(("first_stage_model.", "text_encoders.",
                                                                      "vae.", "cond_stage_model."))}
        try:
            return bfl_to_diffusers(state, width), meta
        except (KeyError, IndexError, ValueError, RuntimeError) as e:  # the converter indexes the keys it expects
            raise NitroFusionError(f"{path} is not a complete BFL-layout FLUX transformer of the base's width "
                                   f"{width} ({describe(e)})") from None
    return {k.removeprefix("transformer."): v for k, v in state.items()}, meta


def load_pipeline(model: str | Path, base: str | Path | None = None, shift: int | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None, merge_lora: bool = False):
    """A stock FluxPipeline with the student transformer and its 1-4 step scheduler (pipelines/dit_pipeline.py); call
    it with guidance_scale = `pipe.nitrofusion_guidance` (the student's embedded guidance), or use `generate_images`."""
    from ..pipelines.dit_pipeline import load_dit_pipeline
    from .lora import FLUX_LORA

    pipe = load_dit_pipeline(FLUX_LORA, model, base, shift, device, dtype, merge_lora, scheduler=load_scheduler,
                             from_file=transformer_from_file, folder_of=transformer_folder)
    pipe.nitrofusion_resolution = pipe.nitrofusion_resolution or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.nitrofusion_size_multiple = pipe.vae_scale_factor * 2  # 2x2 latent packing
    pipe.nitrofusion_guidance = float(pipe.scheduler.config[GUIDANCE_KEY])
    return pipe

def transformer_from_file(ref: ModelRef, dtype: torch.dtype):
    """A FLUX transformer weights file (the BFL layout or diffusers keys) in the architecture of the base folder's
    transformer (load_pipeline then gives every weight its own allocation: pipelines/pipeline.py `own_memory`)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from ...models.weights import check_same_layout

    base = need_base(ref, "a FLUX transformer weights file")
    config = FluxTransformer2DModel.load_config(base / "transformer")
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    state, _ = read_transformer_state(ref.path, width)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    check_same_layout(model.state_dict(), state, f"transformer weights {ref.path}", "the base's FLUX transformer")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return model.eval()


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
