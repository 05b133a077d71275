"""Inference in 1-4 steps from any NitroFusion model of a UNet pipeline family (docs/method.md §5): SDXL in a stock
`StableDiffusionXLPipeline`, Stable Diffusion 1.x/2.x in a stock `StableDiffusionPipeline` (family.py: the family
is read from the folders, never from a name).

A model is one of:
- a run folder (RUN/config.yaml + RUN/student/{unet,scheduler}); the text encoders and VAE come from the
  run's teacher folder (its `teacher` key) unless `base` is given;
- a student folder (unet/ + scheduler/, e.g. written by `nitrofusion transfer`), with `base`;
- an exported diffusers pipeline folder (model_index.json), self-contained;
- a diffusers UNet folder (config.json) or a UNet weights file with `base`: the released NitroSD checkpoints
  are diffusers-key UNet state dicts (.safetensors); original-layout (A1111/ComfyUI) checkpoints are converted
  with diffusers' own converter. The shift comes from `shift`, the file's metadata, or its name.

The scheduler is TimestepShiftLCMScheduler on the base's betas with original_inference_steps=4; the pipeline is
always called with guidance_scale=0 (docs/method.md §5: no classifier-free guidance).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...dtypes import safetensors_dtype
from ...errors import NitroFusionError, describe
from ...models.architectures import check_family, check_file_base, is_lora
from ...models.weights import check_same_layout, read_weights_file
from ...sampling.spec import MAX_SEED, check_generate_values, check_seed, check_steps  # noqa: F401 - check_seed re-exported
from .family import Family, check_pipeline_folder, family_named, family_of_unet_config
from .hub import local_model
from .runtime import is_sdxl_pipeline, runtime_for, set_vae_dtype

SHIFT_BY_NAME = {"realism": 250, "vibrant": 500}  # the released NitroSD-Realism / -Vibrant (docs/method.md §2.3)
SHIFT_METADATA_KEY = "nitrofusion.shifted_timestep"  # written by our single-file and transfer outputs
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@contextlib.contextmanager
def quiet_loading(errors_only: bool = False):
    """No diffusers/transformers progress bars while loading and saving: the command's output is its own result
    and errors (one line each). `errors_only`: diffusers' warnings too (e.g. that an absent T5 "cannot be saved")."""
    from diffusers.utils import logging as dlog

    from ...quiet import transformers_progress_off

    was, level = dlog.is_progress_bar_enabled(), dlog.get_verbosity()
    dlog.disable_progress_bar()
    if errors_only:
        dlog.set_verbosity_error()
    try:
        with transformers_progress_off():
            yield
    finally:
        dlog.set_verbosity(level)
        if was:
            dlog.enable_progress_bar()


@dataclass
class ModelRef:
    """Where a model's parts are: `kind` is run | student | pipeline | unet | file."""

    kind: str
    path: Path
    base: Path | None = None  # pipeline folder with the text encoders, tokenizers and VAE
    resolution: int | None = None  # the run's training resolution (pixels)
    family: Family | None = None  # a run's (its world), else the base folder's, else the pipeline folder's

    @property
    def student_dir(self) -> Path | None:
        return {"run": self.path / "student", "student": self.path}.get(self.kind)

    @property
    def scheduler_dir(self) -> Path | None:
        """The folder of the model's own shifted scheduler, when it has one."""
        for root in (self.student_dir, self.path if self.kind == "pipeline" else None):
            if root is not None and (root / "scheduler" / "scheduler_config.json").is_file():
                cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
                if "shifted_timestep" in cfg:
                    return root / "scheduler"
        return None


def model_kind(path: Path) -> str:
    if path.is_file() or path.suffix in WEIGHT_SUFFIXES:
        return "file"
    if (path / "model_index.json").is_file():
        return "pipeline"
    models = ("unet", "transformer")  # a UNet family's student, or a DiT's (worlds/sd3/)
    if (path / "config.yaml").is_file() and any((path / "student" / m / "config.json").is_file() for m in models):
        return "run"
    if any((path / m / "config.json").is_file() for m in models):
        return "student"
    if (path / "config.json").is_file():
        return "unet"
    raise NitroFusionError(f"no model in {path}: expected a run folder, a student folder (unet/ + scheduler/), an "
                           "exported pipeline folder (model_index.json), a UNet folder or a UNet .safetensors file")


def run_config(run: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((run / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise NitroFusionError(f"{run / 'config.yaml'} is not valid YAML ({type(e).__name__})") from None


def resolve(model: str | Path, base: str | Path | None = None) -> ModelRef:
    """Where the model's parts are; a Hugging Face Hub id as the model, the base or a run's teacher is its snapshot
    (hub.py)."""
    path = local_model(model, "--model")
    kind = model_kind(path)
    ref = ModelRef(kind, path, local_model(base, "--base") if base else None)
    if kind == "file" and not path.is_file():
        raise NitroFusionError(f"UNet weights file not found: {path}")
    if kind == "run":
        cfg = run_config(path)
        world = cfg.get("world", "mini")
        if world == "mini":
            raise NitroFusionError(f"{path} is a mini-world run; export, transfer and pipelines need an SDXL or SD run")
        ref.family = family_named(world)
        ref.resolution = (cfg.get(world) or {}).get("resolution")
        if ref.base is None:
            if not cfg.get("teacher"):
                raise NitroFusionError(f"{path / 'config.yaml'} names no teacher folder; pass --base PIPELINE_FOLDER")
            teacher = str(cfg["teacher"])
            ref.base = local_model(teacher, "--base", f"the run's teacher {teacher} (from {path / 'config.yaml'})")
            if not ref.base.is_dir():
                raise NitroFusionError(f"the run's teacher folder {ref.base} (from {path / 'config.yaml'}) is not "
                                       "there; pass --base PIPELINE_FOLDER")
    if ref.base is not None:
        if not ref.base.is_dir():
            raise NitroFusionError(f"base pipeline folder not found: {ref.base}")
        ref.family = check_pipeline_folder(ref.base, ref.family, "base folder")
        if kind == "file":  # an SD3 transformer needs an SD3 base, a UNet an SDXL or SD one
            check_file_base(path, ref.base, ref.family)
    elif kind == "pipeline":
        ref.family = check_pipeline_folder(path, None, "pipeline folder")
    return ref


def need_base(ref: ModelRef, what: str) -> Path:
    if ref.base is None:
        raise NitroFusionError(f"{ref.path} is a {'UNet file' if ref.kind == 'file' else ref.kind + ' folder'}: "
                               f"{what} needs --base PIPELINE_FOLDER (the SDXL or SD pipeline its UNet belongs to)")
    return ref.base


# ---- UNet weights ---------------------------------------------------------------------------------------------


def is_original_layout(state: dict) -> bool:
    return any(k.startswith("model.diffusion_model.") or k.startswith("input_blocks.") for k in state)


def to_diffusers_unet_keys(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers keys from a diffusers state dict (optionally `unet.`-prefixed) or an original-layout one
    (model.diffusion_model.*, a full A1111/ComfyUI checkpoint included), converted by diffusers' converter."""
    if is_original_layout(state):
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        if not any(k.startswith("model.diffusion_model.") for k in state):  # a bare original-layout UNet
            state = {"model.diffusion_model." + k: v for k, v in state.items()}
        return convert_ldm_unet_checkpoint(state, dict(config))
    return {k.removeprefix("unet."): v for k, v in state.items()}


def unet_from_state(config: dict, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None = None):
    """A UNet built from `config` holding exactly `state` (no random init: SDXL's 2.6B parameters)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    check_same_layout(unet.state_dict(), state, f"UNet weights {source}", "the base UNet config")
    dtype = dtype or torch.float32
    unet.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return unet.eval()


def unet_folder(ref: ModelRef, subfolder: str = "unet") -> Path | None:
    """The diffusers denoiser folder (`subfolder`: unet, or an SD3 pipeline's transformer) of a folder model (None
    for a weights file)."""
    return {"run": ref.path / "student" / subfolder, "student": ref.path / subfolder,
            "pipeline": ref.path / subfolder, "unet": ref.path}.get(ref.kind)


def stored_dtype(folder: Path | None) -> torch.dtype:
    """The dtype a UNet folder's safetensors hold, so it can be read without a lossless-but-doubling fp32
    upcast (an fp16 SDXL UNet is 5 GB, 10 GB in fp32); fp32 when unknown."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    if not files:
        return torch.float32
    with safe_open(str(files[0]), "pt") as f:
        keys = list(f.keys())
        return safetensors_dtype(f.get_slice(keys[0]).get_dtype()) if keys else torch.float32


def load_unet(ref: ModelRef, dtype: torch.dtype | None = None):
    """The model's UNet (fp32 unless `dtype`)."""
    from diffusers import UNet2DConditionModel

    if ref.kind == "file":
        base = need_base(ref, "a UNet weights file")
        config = UNet2DConditionModel.load_config(base / "unet")
        state, _ = read_weights_file(ref.path)
        if is_lora(state):
            return unet_with_lora(base, state, ref.path, dtype)
        check_family(state, config, f"UNet weights {ref.path}", base)
        return unet_from_state(config, to_diffusers_unet_keys(state, config), str(ref.path), dtype)
    folder = unet_folder(ref)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, dtype=dtype or torch.float32)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken folder
        raise NitroFusionError(f"cannot load the UNet in {folder} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    family = family_of_unet_config(unet.config)
    if ref.family is not None and family is not ref.family:
        raise NitroFusionError(f"{folder} holds {family.article} {family.label} UNet, but its base is "
                               f"{ref.family.article} {ref.family.label} pipeline: give a base of the same family")
    return unet.eval()


def unet_with_lora(base: Path, lora: dict[str, torch.Tensor], source: Path, dtype: torch.dtype | None = None):
    """The base UNet with a UNet LoRA (diffusers/PEFT or kohya keys, as `export --format lora` writes) fused in;
    every factor must find its layer."""
    from diffusers import UNet2DConditionModel

    family = check_pipeline_folder(base, None, "base folder")
    if any(k.startswith(("lora_te", "text_encoder", "te_")) for k in lora):
        raise NitroFusionError(f"LoRA {source} also holds text-encoder factors; nitrofusion applies UNet LoRAs only "
                               "(export one without the text encoders)")
    with quiet_loading():
        unet = UNet2DConditionModel.from_pretrained(base / "unet", dtype=torch.float32)
    check_family(lora, unet.config, f"LoRA {source}", base)
    try:
        with quiet_loading():
            converted, alphas = family.pipeline_class().lora_state_dict(dict(lora), unet_config=unet.config)
            unet.load_lora_adapter(converted, network_alphas=alphas, prefix="unet", adapter_name="nitrofusion")
    except Exception as e:  # noqa: BLE001 - diffusers' converters raise many types for a foreign layout
        raise NitroFusionError(f"cannot apply LoRA {source} to the UNet of {base} ({describe(e)})") from None
    wanted = sum(k.endswith(("lora_A.weight", "lora.down.weight")) for k in converted)
    applied = sum(1 for m in unet.modules() if "nitrofusion" in getattr(m, "lora_A", {}))
    if applied != wanted:
        raise NitroFusionError(f"LoRA {source} does not fit the UNet of {base}: {wanted - applied} of its {wanted} "
                               "layers have no place in it (a LoRA for another base model?)")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return unet.to(dtype or torch.float32).eval()


def guess_shift(ref: ModelRef) -> int:
    """The released checkpoints' shift from the file's metadata or name (NitroSD-Realism 250, -Vibrant 500)."""
    if ref.kind == "file" and ref.path.suffix == ".safetensors":
        _, meta = read_weights_file(ref.path)
        if SHIFT_METADATA_KEY in meta:
            return int(meta[SHIFT_METADATA_KEY])
    name = ref.path.name.lower()
    hits = {s for word, s in SHIFT_BY_NAME.items() if word in name}
    if len(hits) == 1:
        return hits.pop()
    raise NitroFusionError(f"cannot tell the timestep shift of {ref.path.name}: pass --shift 250 (NitroSD-Realism) "
                           "or --shift 500 (NitroSD-Vibrant), or the shift it was distilled with")


def load_scheduler(ref: ModelRef, shift: int | None = None, cls=None, build=None, fallback=None):
    """The model's 1-4 step scheduler: its own (re-shifted if `shift`), else `build(base config, shift)` with the
    shift from `shift` or `fallback(ref)`. Defaults: the UNet families' shifted LCM scheduler, the shift guessed
    from a file's metadata or name; the flow family passes its own (worlds/sd3/pipeline.py)."""
    from ...sampling.scheduler import TimestepShiftLCMScheduler
    from ...sampling.student import shifted_scheduler

    cls, build, fallback = cls or TimestepShiftLCMScheduler, build or shifted_scheduler, fallback or guess_shift
    if shift is not None and not 1 <= shift <= 1000:
        raise NitroFusionError(f"--shift must be in 1..1000 (got {shift})")
    own = ref.scheduler_dir
    if own is not None:
        sched = cls.from_pretrained(own)
        return sched if shift is None else build(dict(sched.config), shift)
    if shift is None:
        shift = fallback(ref)
    source = ref.path if ref.kind == "pipeline" else need_base(ref, "sampling")
    config = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    return build(config, shift)


def load_pipeline(model: str | Path, base: str | Path | None = None, shift: int | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None, fast: bool = False,
                  vae: str | Path | None = None, vae_dtype: torch.dtype | None = None, log=print):
    """A stock diffusers `StableDiffusionXLPipeline` (or `StableDiffusionPipeline` for an SD model) with the student
    UNet and the shifted LCM scheduler (docs/method.md §5). Call it with guidance_scale=0 and 1-4 steps, or use
    `generate_images`. `vae`: decode with this AutoencoderTiny/AutoencoderKL folder; `fast`: fused QKV, channels_last
    and torch.compile where it runs, CUDA graphs on a GPU (fast.py); `vae_dtype`: the decoder's precision (default:
    fp32 where SDXL's VAE would overflow in fp16, or bf16 with `fast` on a GPU that has it; else `dtype`)."""
    if vae_dtype == torch.bfloat16 and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise NitroFusionError("this GPU has no bf16: use --vae-dtype fp32")
    if vae is not None:
        from .fast import load_vae

        load_vae(vae)  # a wrong folder fails before the pipeline loads
    ref = resolve(model, base)
    if ref.kind == "pipeline" and ref.base is not None:
        raise NitroFusionError(f"{ref.path} is a complete pipeline folder; --base applies to run folders and UNet "
                               "files only")
    if ref.kind == "pipeline" and ref.scheduler_dir is None and shift is None:
        raise NitroFusionError(f"{ref.path} has no TimestepShiftLCMScheduler; pass --shift S to sample its UNet "
                               "with one (250 for NitroSD-Realism, 500 for -Vibrant)")
    if ref.kind != "pipeline":
        need_base(ref, "a pipeline")
    scheduler = load_scheduler(ref, shift)
    dtype = dtype or torch.float32
    parts = {"scheduler": scheduler}
    folder = ref.path
    if ref.kind != "pipeline":
        parts["unet"] = load_unet(ref, dtype)
        folder = need_base(ref, "a pipeline")
    if ref.family.pipeline == "StableDiffusionPipeline":  # no safety checker: NitroFusion's outputs are the user's
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        with quiet_loading():
            pipe = ref.family.pipeline_class().from_pretrained(folder, dtype=dtype, **parts)
    except NitroFusionError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken folder surfaces as many exception types
        raise NitroFusionError(f"cannot load the {ref.family.label} pipeline in {folder} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.nitrofusion_resolution = ref.resolution  # the run's training resolution: the default image size
    pipe = pipe.to(device)
    if vae is not None:
        from .fast import use_vae

        use_vae(pipe, vae)
    if fast:
        from .fast import make_fast

        make_fast(pipe, vae_dtype=vae_dtype, log=log)
    elif vae_dtype is not None:
        set_vae_dtype(pipe, vae_dtype)
    return pipe


# ---- generation -----------------------------------------------------------------------------------------------


def own_memory(pipe) -> None:
    """Every weight in its own fresh allocation instead of wherever its file put it: MKL's batch-1 matrix-vector
    product rounds differently for a weight that is not 16-byte aligned (from_pretrained maps a file, so a tensor's
    alignment depends on the header's length), so the same transformer read from two folders, or from a folder and
    a single file, would give images that differ in the last bit. The DiT families call it on the CPU."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for t in (*module.parameters(), *module.buffers()):  # tied weights are one Parameter: copied once
                t.data = t.data.clone()


def denoiser(pipe):
    """The pipeline's network: a UNet, or an SD3 pipeline's transformer."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def default_size(pipe) -> int:
    return getattr(pipe, "nitrofusion_resolution", None) or denoiser(pipe).config.sample_size * pipe.vae_scale_factor


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE's scale times the UNet's downsampling or the DiT's patch."""
    if getattr(pipe, "nitrofusion_size_multiple", None):  # set by the family's loader (FLUX: 2x2 latent packing)
        return pipe.nitrofusion_size_multiple
    config = denoiser(pipe).config
    return pipe.vae_scale_factor * (config.patch_size if "patch_size" in config else
                                    2 ** (len(config.block_out_channels) - 1))


def image_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """Image i draws its x_T and its re-noising noise from a CPU generator seeded seed + i: the same seed gives
    the same images on any device and batch size (batch size only changes float rounding inside the UNet)."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(start, start + count)]


@torch.no_grad()
def generate_images(pipe, prompts: list[str], steps: int, seed: int = 0, height: int | None = None,
                    width: int | None = None, batch_size: int = 4) -> list:
    """PIL images, one per prompt, in 1-4 steps (docs/method.md §5, §8); image i draws its x_T and its re-noising
    noise from a generator seeded seed + i. SDXL pipelines run through their runtime (runtime.py: the same images
    bit for bit), others through their own call."""
    check_steps(steps)
    if not prompts:
        raise NitroFusionError("no prompt given: use --prompt TEXT or --prompts FILE")
    if batch_size < 1:
        raise NitroFusionError(f"--batch-size must be >= 1 (got {batch_size})")
    size = default_size(pipe)
    height, width = height or size, width or size
    multiple = size_multiple(pipe)
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise NitroFusionError(f"height and width must be positive multiples of {multiple} for this model "
                               f"(got {height}x{width})")
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = image_generators(seed, start, len(chunk))
        if is_sdxl_pipeline(pipe):  # the pipeline's images without its per-call Python (runtime.py)
            images += runtime_for(pipe)(chunk, steps, generators, height, width)
            continue
        own = hasattr(pipe.scheduler, "generator")  # TimestepShiftFlowScheduler: SD3's pipeline passes step() none
        if own:
            pipe.scheduler.generator = generators
        try:
            # no classifier-free guidance; a guidance-distilled family's embedded guidance (FLUX: worlds/flux/) is the
            # value its student was trained at, which its loader sets as `nitrofusion_guidance`
            guidance = getattr(pipe, "nitrofusion_guidance", 0.0)
            out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                       generator=generators, output_type="pil")
        finally:
            if own:
                pipe.scheduler.generator = None
        images += out.images
    return images


def generate_to_folder(model: str | Path, prompts: list[str], steps: int, seed: int, out: str | Path,
                       base: str | Path | None = None, shift: int | None = None, height: int | None = None,
                       width: int | None = None, batch_size: int = 4, num_per_prompt: int = 1,
                       device: str = "cpu", dtype: torch.dtype | None = None, fast: bool = False,
                       vae: str | Path | None = None, vae_dtype: torch.dtype | None = None) -> list[Path]:
    check_steps(steps)  # before any model loads
    check_generate_values(height, width, batch_size, num_per_prompt)
    if not prompts:
        raise NitroFusionError("no prompt given: use --prompt TEXT or --prompts FILE")
    pipe = load_pipeline(model, base=base, shift=shift, device=device, dtype=dtype, fast=fast, vae=vae,
                         vae_dtype=vae_dtype)
    prompts = [p for p in prompts for _ in range(num_per_prompt)]
    images = generate_images(pipe, prompts, steps, seed, height, width, batch_size)
    from ...evaluation.viz import save_images

    return save_images(images, prompts, Path(out), steps, seed, num_per_prompt)
