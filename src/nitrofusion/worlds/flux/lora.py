"""FLUX LoRAs in diffusers' FLUX LoRA format: `pytorch_lora_weights.safetensors` as `FluxPipeline.save_lora_weights`
writes it (keys `transformer.<module>.lora_A.weight` / `.lora_B.weight`, the adapter's LoraConfig in the header under
`lora_adapter_metadata`, so `load_lora_weights` rebuilds the same rank, alpha and targets), plus the run's shift
(`nitrofusion.shifted_timestep`), as sd3/lora.py writes SD3's.

Two sources, both written by `export --format lora` (with lora_report.json):
- a LoRA run: the trainer writes its adapters into run/student/lora and export hands them on unchanged (written again
  so --dtype applies). `generate` puts them on the base's transformer as adapters: the training-time student exactly.
- a full student (a run, a student folder or an exported pipeline folder, with its base: the run's teacher folder or
  --base): a truncated SVD of student - base at `--rank`, per Linear of the transformer (the shared `lora_from_delta`,
  worlds/pipelines/export.py), with the error in lora_report.json; what a LoRA cannot hold (biases, norm weights) is
  counted there as uncovered."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import NitroFusionError, describe
from ..pipelines.export import (
    LORA_METADATA_KEY,
    PEFT_LORA_FILE,
    save_transformer_lora,
    staged_output,
    trained_lora_dir,
)
from ..pipelines.pipeline import SHIFT_METADATA_KEY, ModelRef, quiet_loading, resolve

PREFIX = "transformer."  # diffusers' prefix of a pipeline's transformer factors and metadata
FORMAT = "diffusers FLUX LoRA (PEFT keys)"
FLUX_LORA_COVERAGE = ("every Linear of the FLUX transformer (attention q/k/v/out of both streams of the double blocks "
                      "and of the single blocks, feed-forwards, the single blocks' MLP in/out, AdaLN modulations, the "
                      "timestep/guidance/pooled-text embedders, the image and text token embedders, the final "
                      "projection)")


def save_lora_files(folder: Path, factors: dict[str, torch.Tensor], shift: int | None, metadata: dict) -> None:
    """`factors` and their LoraConfig in diffusers' FLUX LoRA format, with the shift and alpha folded into lora_B
    (worlds/pipelines/export.py `save_transformer_lora`)."""
    from diffusers import FluxPipeline

    save_transformer_lora(FluxPipeline, folder, factors, shift, metadata)


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict, int | None]:
    """(factors under PEFT keys without the prefix, the LoraConfig as saved, the shift or None)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    packed = json.loads(header.get(LORA_METADATA_KEY, "{}"))  # flat: "transformer.r", "transformer.lora_alpha"
    meta = {k.removeprefix(PREFIX): v for k, v in packed.items() if k.startswith(PREFIX)}
    shift = int(header[SHIFT_METADATA_KEY]) if SHIFT_METADATA_KEY in header else None
    return {k.removeprefix(PREFIX): v for k, v in load_file(str(path)).items()}, meta, shift


def _shift(ref: ModelRef) -> int | None:
    own = ref.scheduler_dir  # the model's own scheduler is where its shift lives
    return json.loads((own / "scheduler_config.json").read_text())["shifted_timestep"] if own is not None else None


def export_lora(model: str | Path, out: str | Path, base: str | Path | None = None, rank: int | None = None,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
    """out/pytorch_lora_weights.safetensors (`load_lora_weights` into a pipeline of the base FLUX folder, the run's
    teacher folder unless --base) and out/lora_report.json. A LoRA run hands on its trained adapters (no --rank);
    a full student needs `rank`: its LoRA is a truncated SVD of student - base."""
    out = Path(out)
    if rank is not None and rank < 1:
        raise NitroFusionError(f"--rank must be >= 1 (got {rank})")
    if out.exists():
        raise NitroFusionError(f"{out} already exists; remove it or choose another --out")
    ref = resolve(model, base)
    lora_dir = trained_lora_dir(ref)
    if lora_dir is not None:
        if rank is not None:
            raise NitroFusionError(f"{model} trained LoRA adapters, which export hands on exactly; drop --rank")
        return export_trained_lora(ref, lora_dir, out, dtype)
    if ref.kind == "file":
        raise NitroFusionError(f"{model} is a weights file: export --format lora takes a run, a student folder or an "
                               "exported pipeline folder (a LoRA file is one already; a full transformer file: "
                               "extract from the folder it came from)")
    if rank is None:
        raise NitroFusionError(f"{model} is a full student: its LoRA is a truncated SVD of student - base; give "
                               "--rank N (e.g. 64; the report states the error)")
    return extract_lora(ref, out, rank, dtype, device)


def export_trained_lora(ref: ModelRef, lora_dir: Path, out: Path, dtype: torch.dtype | None) -> dict:
    """A LoRA run's trained adapters, unchanged (written again so --dtype applies), and lora_report.json."""
    from ...io import tensor_bytes

    path = lora_dir / PEFT_LORA_FILE
    factors, meta, shift = read_lora(path)
    if not meta.get("r"):
        raise NitroFusionError(f"{path} lacks its adapter settings (rank, alpha); re-run the training's last step")
    shift = _shift(ref) if ref.scheduler_dir is not None else shift
    if dtype is not None:
        factors = {k: v.to(dtype) for k, v in factors.items()}
    report = {"source": "the run's trained LoRA adapters (exact)", "format": FORMAT,
              "rank": int(meta["r"]), "alpha": float(meta.get("lora_alpha") or meta["r"]),
              "targets": meta.get("target_modules"), "lora_layers": len(factors) // 2,
              "lora_parameters": sum(v.numel() for v in factors.values()), "shift": shift}
    with staged_output(out, tensor_bytes(factors)) as tmp:
        save_lora_files(tmp, factors, shift, meta)
        (tmp / "lora_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def extract_lora(ref: ModelRef, out: Path, rank: int, dtype: torch.dtype | None,
                 device: str | torch.device = "cpu") -> dict:
    """A full student's LoRA: per-layer truncated SVD of student - base at `rank` (alpha = rank: scale 1), the
    layers that changed as the adapter's targets, and the error report (lora_from_delta's, plus the base and the
    shift)."""
    from diffusers import FluxTransformer2DModel

    from ...io import tensor_bytes
    from ..pipelines.export import lora_from_delta
    from ..pipelines.family import FLUX
    from ..pipelines.pipeline import stored_dtype, unet_folder

    if ref.base is None:
        what = {"student": "student folder", "pipeline": "pipeline folder"}.get(ref.kind, "transformer folder")
        raise NitroFusionError(f"{ref.path} is {'an' if ref.kind == 'pipeline' else 'a'} {what}: a LoRA of student - "
                               "base needs --base PIPELINE_FOLDER (the FLUX pipeline the student was distilled from)")
    if ref.family is not FLUX:
        f = ref.family
        raise NitroFusionError(f"{ref.path} holds a FLUX transformer but --base {ref.base} is {f.article} {f.label} "
                               f"pipeline ({f.pipeline}): give the FLUX pipeline it was distilled from")
    folders = {"student": unet_folder(ref, "transformer"), "base": ref.base / "transformer"}
    models = {}
    for role, folder in folders.items():
        try:  # each in the dtype it is stored in: the delta is taken per layer in float64, so nothing is lost
            with quiet_loading(errors_only=True):
                models[role] = FluxTransformer2DModel.from_pretrained(folder, dtype=stored_dtype(folder))
        except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken folder
            raise NitroFusionError(f"cannot load the {role} transformer in {folder} ({describe(e)})") from None
    lora, report = lora_from_delta(models["student"], models["base"], rank, device, what="transformer",
                                   coverage=FLUX_LORA_COVERAGE)
    del models
    if not lora:
        raise NitroFusionError(f"{ref.path}'s transformer equals the base's ({ref.base}) in every Linear layer: "
                               "there is no delta for a LoRA to hold")
    if dtype is not None:
        lora = {k: v.to(dtype) for k, v in lora.items()}
    targets = [k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")]
    meta = {"r": rank, "lora_alpha": rank, "target_modules": targets}  # full module paths: exactly these layers
    shift = _shift(ref)
    report.update(source="truncated SVD of student - base (see the errors)", format=FORMAT,
                  alpha=float(rank), base=str(ref.base), shift=shift)
    with staged_output(out, tensor_bytes(lora)) as tmp:
        save_lora_files(tmp, lora, shift, meta)
        (tmp / "lora_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
