"""The DiT families' LoRAs (SD3 / SD3.5, FLUX.1) in diffusers' transformer LoRA format:
`pytorch_lora_weights.safetensors` as the pipeline's `save_lora_weights` writes it (keys
`transformer.<module>.lora_A.weight` / `.lora_B.weight`, the adapter's LoraConfig in the header under
`lora_adapter_metadata`, so `load_lora_weights` rebuilds the same rank, alpha and targets), plus the run's shift
(`nitrofusion.shifted_timestep`) so the file samples without --shift. A family (DiTLora) names its pipeline,
transformer and wording; the reading, writing, export and application are shared.

Two sources, both written by `export --format lora` (with lora_report.json):
- a LoRA run: the trainer writes its adapters into run/student/lora and export hands them on unchanged (written again
  so --dtype applies). `generate` puts them on the base's transformer as adapters: the training-time student exactly
  (the run's student/transformer, the adapters merged in fp32, is what the diffusers and single-file exports write).
- a full student (a run, a student folder, an exported pipeline folder or a transformer folder, with its base: the
  run's teacher folder or --base): a truncated SVD of student - base at `--rank`, per layer (`lora_from_delta`,
  export.py), with the error in lora_report.json; what a LoRA cannot hold (biases, norm weights) is counted there as
  uncovered."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import NitroFusionError, describe
from .export import (
    LORA_METADATA_KEY,
    PEFT_LORA_FILE,
    lora_export_source,
    save_transformer_lora,
    staged_output,
    trained_lora_dir,
)
from .family import Family
from .pipeline import SHIFT_METADATA_KEY, ModelRef, model_kind, quiet_loading

PREFIX = "transformer."  # diffusers' prefix of a pipeline's transformer factors and metadata


@dataclass(frozen=True)
class DiTLora:
    family: Family  # the pipeline family a --base must be (family.py's SD3 or FLUX); its pipeline writes the format
    name: str  # as users say it: "SD3", "FLUX"
    transformer_class: str
    coverage: str  # the layers lora_from_delta covers, for the report
    layers: str  # the same in a few words: "Linear/Conv2d", "Linear"

    @property
    def format(self) -> str:  # lora_report.json's
        return f"diffusers {self.name} LoRA (PEFT keys)"

    @property
    def format_said(self) -> str:  # the CLI's
        return f"diffusers' {self.name} LoRA format"


def save_lora_files(spec: DiTLora, folder: Path, factors: dict[str, torch.Tensor], shift: int | None,
                    metadata: dict) -> None:
    """`factors` and their LoraConfig in the family's diffusers LoRA format, with the shift and alpha folded into
    lora_B (export.py `save_transformer_lora`)."""
    import diffusers

    save_transformer_lora(getattr(diffusers, spec.family.pipeline), folder, factors, shift, metadata)


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


def lora_file_keys(path: Path) -> list[str] | None:
    """The tensor names of a .safetensors LoRA file (from its header), or None if it holds no LoRA."""
    from ...models.architectures import is_lora
    from ...models.weights import safetensors_header

    if path.suffix != ".safetensors" or not path.is_file():
        return None
    header, _ = safetensors_header(path)
    keys = [k for k in header if k != "__metadata__"]
    return keys if is_lora(dict.fromkeys(keys)) else None


def lora_of(ref: ModelRef) -> Path | None:
    """The LoRA file a model puts on its base's transformer: a LoRA run's (or its student folder's) trained adapters,
    or a LoRA weights file; None for any other model."""
    if ref.kind == "file":
        return ref.path if lora_file_keys(ref.path) is not None else None
    folder = trained_lora_dir(ref)
    return folder / PEFT_LORA_FILE if folder is not None else None


def is_lora_run(model: str | Path) -> bool:
    """Whether `model` is a LoRA run (or its student folder): it has trained adapters to export."""
    from .hub import local_model

    path = local_model(model, "--model")
    return path.is_dir() and trained_lora_dir(ModelRef(model_kind(path), path)) is not None


def own_shift(ref: ModelRef) -> int | None:
    """The shift in the model's own scheduler, where a run or student keeps it; None without one."""
    own = ref.scheduler_dir
    return json.loads((own / "scheduler_config.json").read_text())["shifted_timestep"] if own is not None else None


def export_lora(spec: DiTLora, model: str | Path, out: str | Path, base: str | Path | None = None,
                rank: int | None = None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
    """out/pytorch_lora_weights.safetensors (`load_lora_weights` into a pipeline of the base folder, the run's teacher
    folder unless --base) and out/lora_report.json. A LoRA run hands on its trained adapters (no --rank); a full
    student needs `rank`: its LoRA is a truncated SVD of student - base."""
    out = Path(out)
    ref, lora_dir = lora_export_source(model, out, rank, base)
    if lora_dir is not None:
        return export_trained_lora(spec, ref, lora_dir, out, dtype)
    if ref.kind == "file":
        raise NitroFusionError(f"{model} is a weights file: export --format lora takes a run, a student folder or an "
                               "exported pipeline folder (a LoRA file is one already; a full transformer file: "
                               "extract from the folder it came from)")
    if rank is None:
        raise NitroFusionError(f"{model} is a full student: its LoRA is a truncated SVD of student - base; give "
                               "--rank N (e.g. 64; the report states the error)")
    return extract_lora(spec, ref, out, rank, dtype, device)


def _write(spec: DiTLora, out: Path, factors: dict[str, torch.Tensor], shift: int | None, meta: dict,
           report: dict) -> dict:
    from ...io import tensor_bytes

    with staged_output(out, tensor_bytes(factors)) as tmp:
        save_lora_files(spec, tmp, factors, shift, meta)
        (tmp / "lora_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def export_lines(spec: DiTLora, model: str | Path, out: str | Path, options: dict) -> list[str]:
    """`export --format lora` as the CLI reports it: the extraction's error figures (as the UNet families print them),
    or the trained adapters handed on."""
    from ...dtypes import parse_dtype

    r = export_lora(spec, model, out, base=options.get("base"), rank=options.get("rank"),
                    dtype=parse_dtype(options.get("dtype")), device=options.get("device") or "cpu")
    if "relative_error_total" in r:
        line = (f"LoRA rank {r['rank']} on {r['lora_layers']} {spec.layers} layers ({r['lora_parameters']:,} "
                f"parameters), {spec.format_said}: relative error of the delta {r['relative_error_total']:.4f} "
                f"overall, {r['relative_error_covered']:.4f} on those layers; {100 * r['uncovered_fraction']:.2f}% of "
                "the delta (squared norm) is in biases/norms that LoRA cannot hold")
    else:
        line = (f"LoRA rank {r['rank']} (alpha {r['alpha']:g}) on {r['lora_layers']} layers "
                f"({r['lora_parameters']:,} parameters): {r['source']}, {spec.format_said}")
    return [line, f"exported to {out}"]


def export_trained_lora(spec: DiTLora, ref: ModelRef, lora_dir: Path, out: Path, dtype: torch.dtype | None) -> dict:
    """A LoRA run's trained adapters, unchanged (written again so --dtype applies), and lora_report.json."""
    path = lora_dir / PEFT_LORA_FILE
    factors, meta, shift = read_lora(path)
    if not meta.get("r"):
        raise NitroFusionError(f"{path} lacks its adapter settings (rank, alpha); re-run the training's last step")
    shift = own_shift(ref) if ref.scheduler_dir is not None else shift
    if dtype is not None:
        factors = {k: v.to(dtype) for k, v in factors.items()}
    report = {"source": "the run's trained LoRA adapters (exact)", "format": spec.format,
              "rank": int(meta["r"]), "alpha": float(meta.get("lora_alpha") or meta["r"]),
              "targets": meta.get("target_modules"), "lora_layers": len(factors) // 2,
              "lora_parameters": sum(v.numel() for v in factors.values()), "shift": shift}
    return _write(spec, out, factors, shift, meta, report)


def extract_lora(spec: DiTLora, ref: ModelRef, out: Path, rank: int, dtype: torch.dtype | None,
                 device: str | torch.device = "cpu") -> dict:
    """A full student's LoRA: per-layer truncated SVD of student - base at `rank` (alpha = rank: scale 1), the
    layers that changed as the adapter's targets, and the error report (lora_from_delta's, plus the base and the
    shift)."""
    import diffusers

    from .export import lora_from_delta
    from .pipeline import stored_dtype, unet_folder

    if ref.base is None:
        what = {"student": "student folder", "pipeline": "pipeline folder"}.get(ref.kind, "transformer folder")
        raise NitroFusionError(f"{ref.path} is {'an' if ref.kind == 'pipeline' else 'a'} {what}: a LoRA of student - "
                               f"base needs --base PIPELINE_FOLDER (the {spec.name} pipeline the student was "
                               "distilled from)")
    if ref.family is not spec.family:
        f = ref.family
        raise NitroFusionError(f"{ref.path} holds {spec.family.article} {spec.name} transformer but --base {ref.base} "
                               f"is {f.article} {f.label} pipeline ({f.pipeline}): give the {spec.name} pipeline it "
                               "was distilled from")
    folders = {"student": unet_folder(ref, "transformer"), "base": ref.base / "transformer"}
    cls = getattr(diffusers, spec.transformer_class)
    models = {}
    for role, folder in folders.items():
        try:  # each in the dtype it is stored in: the delta is taken per layer in float64, so nothing is lost
            with quiet_loading(errors_only=True):
                models[role] = cls.from_pretrained(folder, dtype=stored_dtype(folder))
        except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken folder
            raise NitroFusionError(f"cannot load the {role} transformer in {folder} ({describe(e)})") from None
    lora, report = lora_from_delta(models["student"], models["base"], rank, device, what="transformer",
                                   coverage=spec.coverage)
    del models
    if not lora:
        raise NitroFusionError(f"{ref.path}'s transformer equals the base's ({ref.base}) in every {spec.layers} "
                               "layer: there is no delta for a LoRA to hold")
    if dtype is not None:
        lora = {k: v.to(dtype) for k, v in lora.items()}
    targets = [k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")]
    meta = {"r": rank, "lora_alpha": rank, "target_modules": targets}  # full module paths: exactly these layers
    shift = own_shift(ref)
    report.update(source="truncated SVD of student - base (see the errors)", format=spec.format,
                  alpha=float(rank), base=str(ref.base), shift=shift)
    return _write(spec, out, lora, shift, meta, report)


def apply_lora(spec: DiTLora, pipe, path: Path, base: Path, fuse: bool = False) -> None:
    """The LoRA file's adapters on the pipeline's transformer through diffusers' own loader (rank, alpha and targets
    from the file's metadata); every transformer factor must find its layer. `fuse`: merged into the weights and
    unloaded, a plain transformer (what an exported folder or single file holds)."""
    from ...models.student import ADAPTER

    keys = lora_file_keys(path) or []
    wanted = sum(k.endswith(".lora_A.weight") for k in keys if not k.startswith("text_encoder"))
    try:
        with quiet_loading(errors_only=True):
            pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
    except Exception as e:  # noqa: BLE001 - diffusers and peft raise many types for a LoRA that does not fit
        raise NitroFusionError(f"cannot apply LoRA {path} to the {spec.name} transformer of {base} "
                               f"({describe(e)})") from None
    applied = sum(1 for m in pipe.transformer.modules() if ADAPTER in getattr(m, "lora_A", {}))
    if applied != wanted:
        raise NitroFusionError(f"LoRA {path} does not fit the {spec.name} transformer of {base}: {wanted - applied} "
                               f"of its {wanted} layers have no place in it (a LoRA for another {spec.name} model?)")
    if fuse:
        pipe.transformer.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER])
        pipe.transformer.unload_lora()
