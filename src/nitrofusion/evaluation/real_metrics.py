"""Real-model quality metrics for SDXL-size models (docs/method.md §6), each computed through its usual library with the
user's weights: a local path, or a hub id on a connected machine. A metric whose weights or library are missing
is SKIPPED with a one-line reason in the results, never faked and never replaced by a stand-in under its name.
Weights that are given but cannot be loaded are an error (before any image is generated), not a skip.

Metrics (the keys of `RealMetrics.compute()`; each is {"value", "n", "library", "weights", ...} or {"skipped"}):
- clip_score: torchmetrics `CLIPScore` with a transformers CLIP (`clip`, the paper's ViT-B/32:
  openai/clip-vit-base-patch32), reported as the paper does: the mean RAW cosine (0.320), i.e. torchmetrics'
  score / 100, without its clamp at 0. Captions longer than CLIP's 77 tokens are truncated keeping the end token.
- fid: torchmetrics `FrechetInceptionDistance` (2048-d pool features of torch-fidelity's InceptionV3), loaded from
  the local `inception` weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth), against the
  reference images. torch-fidelity needs torchvision, which this project does not install; without it FID is
  skipped.
- fd_clip: Frechet distance on CLIP image embeddings of the `clip` model (FD-CLIP, Kynkaenniemi et al. 2023;
  clean-fid's "clip_vit_b_32"), via torchmetrics' FID with a CLIP feature extractor, against the same
  reference images. A different metric from FID, with different values: never report it as FID.
- aesthetic: the LAION improved-aesthetic-predictor MLP (`aesthetic`: sac+logos+ava1-l14-linearMSE.pth) on the
  L2-normalised image embedding of CLIP ViT-L/14 (`aesthetic_clip`: openai/clip-vit-large-patch14), as in its
  simple_inference.py (there via the openai `clip` package; the transformers port gives the same embedding).
- image_reward: the `image-reward` package (`ImageReward.load(image_reward).score(prompt, image)`); it needs
  torchvision and old pins, so it is never a dependency here: without it the metric is skipped.

Images enter as [B, 3, H, W] floats in [0, 1] (or uint8, or PIL images) and are quantised to uint8 first, as
when they are saved to PNG and scored from files. Nothing keeps the images: FID keeps feature sums, the others
running sums, so 5000 images at 1024x1024 stream through in `batch_size` chunks.

COCO-5k protocol (the paper's, docs/method.md §6):
1. Captions: `coco_captions(captions_val2014.json, n=5000, seed=0)` picks 5000 images of the COCO captions
   annotation file at random with a fixed seed and one of each image's captions, giving (caption, file_name)
   pairs; `write_caption_pairs` saves them as a TSV so the exact set can be published and reused
   (`load_caption_pairs` reads either file).
2. Generation: one image per caption at the model's own size (1024x1024 for SDXL), fixed seeds, no CFG.
3. Reference: the same 5000 COCO images (`reference` = the val2014 folder, `reference_files` = the pairs' file
   names), each centre-cropped to a square and resized to `reference_size` (bicubic) when read.
4. Each metric resizes both sides to its own input: 299x299 antialiased bilinear inside torch-fidelity (FID);
   the CLIP processor's bicubic shortest-side resize and centre crop (CLIP score, FD-CLIP, aesthetic);
   ImageReward's own 224 transform.
5. Report clip_score (mean raw cosine), fid (5000 generated vs 5000 reference), aesthetic and image_reward
   means. FID at 5k samples is higher than at 30k/50k: compare only numbers measured with the same protocol.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NitroFusionError, describe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FID_FEATURES = 2048
PIP_TORCH_FIDELITY = "needs torch-fidelity (and torchvision), not importable here: pip install torch-fidelity"
PIP_IMAGE_REWARD = "needs the image-reward package (and torchvision), not importable here: pip install image-reward"
METRICS = ("clip_score", "fid", "fd_clip", "aesthetic", "image_reward")


@dataclass
class RealMetricsConfig:
    clip: str = ""  # transformers CLIP folder or hub id (the paper: openai/clip-vit-base-patch32); "" = skip
    inception: str = ""  # torch-fidelity InceptionV3 weights file for FID; "" = skip
    aesthetic: str = ""  # LAION improved-aesthetic-predictor MLP weights (.pth or .safetensors); "" = skip
    aesthetic_clip: str = ""  # the CLIP ViT-L/14 it reads (openai/clip-vit-large-patch14)
    image_reward: str = ""  # ImageReward checkpoint path, or "ImageReward-v1.0" on a connected machine; "" = skip
    reference: str = ""  # folder of reference images for FID / FD-CLIP; "" = skip those two
    reference_files: list[str] | None = None  # only these files of `reference` (the COCO-5k subset); None = all
    reference_size: int = 512  # reference images are centre-cropped to a square of this size when read
    batch_size: int = 32
    device: str = ""  # "" = cuda when available, else cpu


def _device(name: str) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _as_tensor(out: Any) -> Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling (projected embedding in pooler_output) where 4.x
    # returned the tensor; torchmetrics 1.9 expects the tensor (its issue #3407, fixed after 1.9.0)
    return out if isinstance(out, Tensor) else out.pooler_output


class _TensorFeatures(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return tensors on any transformers version."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return _as_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return _as_tensor(self.model.get_text_features(*args, **kwargs))


class _TruncatingProcessor:
    """A CLIPProcessor whose text side truncates to CLIP's context keeping the end token (openai
    clip.tokenize(truncate=True)); torchmetrics would cut the ids after tokenising, dropping the end token
    that CLIP pools at."""

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("text") is not None:
            kwargs.update(truncation=True, max_length=self.max_length)
        return self.processor(*args, **kwargs)


class ClipImageFeatures(nn.Module):
    """Projected CLIP image embeddings (not normalised) of uint8 [B, 3, H, W] images, preprocessed by the
    model's own CLIP image processor; a torchmetrics FID feature extractor (num_features skips its dummy pass)."""

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__()
        self.model = model
        self.image_processor = getattr(processor, "image_processor", processor)
        self.num_features = int(model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        pixels = self.image_processor(images=[i.cpu() for i in images], return_tensors="pt")["pixel_values"]
        device = next(self.model.parameters()).device
        return _as_tensor(self.model.get_image_features(pixel_values=pixels.to(device))).float()


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head (simple_inference.py): linear layers, no activations."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)


_AESTHETIC_FIX = "give the LAION improved-aesthetic-predictor file (e.g. sac+logos+ava1-l14-linearMSE.pth)"


def load_aesthetic_mlp(path: str | Path) -> AestheticMLP:
    """The predictor from its state-dict file (torch.save of layers.N.weight/bias, or the same in safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise NitroFusionError(f"aesthetic predictor weights not found: {path}; {_AESTHETIC_FIX}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a bad file surfaces as many exception types
        raise NitroFusionError(f"cannot read aesthetic predictor weights {path} ({describe(e)}); "
                               f"{_AESTHETIC_FIX}") from None
    first = state.get("layers.0.weight") if isinstance(state, dict) else None
    if not isinstance(first, Tensor) or first.ndim != 2:
        raise NitroFusionError(f"{path} is not an improved-aesthetic-predictor state dict (no 2-d layers.0.weight); "
                               f"{_AESTHETIC_FIX}")
    mlp = AestheticMLP(first.shape[1])
    expected = mlp.state_dict()
    if set(state) != set(expected):
        wrong = sorted(set(state) ^ set(expected))
        raise NitroFusionError(f"{path} is not an improved-aesthetic-predictor state dict (missing or unexpected "
                               f"keys: {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}); {_AESTHETIC_FIX}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise NitroFusionError(f"{path}: {key} has shape {tuple(state[key].shape)}, the predictor's is "
                                   f"{tuple(value.shape)}; {_AESTHETIC_FIX}")
    mlp.load_state_dict({k: v.float() for k, v in state.items()})
    return mlp.eval().requires_grad_(False)


def load_clip(name: str, what: str) -> tuple[nn.Module, Any]:
    """A transformers CLIPModel and its CLIPProcessor from a saved folder, or a hub id on a connected machine."""
    from transformers import CLIPModel, CLIPProcessor

    from ..quiet import transformers_progress_off

    try:
        with transformers_progress_off():
            model = CLIPModel.from_pretrained(name)
            processor = CLIPProcessor.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - missing files, no network and bad configs all land here
        raise NitroFusionError(f"cannot load the CLIP model {name!r} for {what} ({describe(e)}); give a folder "
                               "saved by transformers (model + processor files) or a hub id on a connected "
                               "machine") from None
    return model.eval().requires_grad_(False), processor


def _torch_fidelity_missing() -> str | None:
    try:
        import torch_fidelity  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or torchvision's own import errors
        return PIP_TORCH_FIDELITY
    return None


def _image_reward_missing() -> str | None:
    try:
        import ImageReward  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or its torchvision/timm/transformers import errors
        return PIP_IMAGE_REWARD
    return None


def to_uint8(images: Tensor | Sequence[Any]) -> Tensor:
    """[B, 3, H, W] uint8 on the CPU from floats in [0, 1], uint8 tensors, or a list of same-size PIL images."""
    if not isinstance(images, Tensor):
        arrays = [np.asarray(im.convert("RGB")) for im in images]
        if len({a.shape for a in arrays}) > 1:
            raise NitroFusionError("images of one batch must share a size (resize them, or pass them one by one)")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if images.ndim != 4 or images.shape[1] != 3:
        raise NitroFusionError(f"images must be [B, 3, H, W] (got shape {tuple(images.shape)})")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    lo, hi = images.min().item(), images.max().item()
    if lo < -0.01 or hi > 1.01:  # [-1, 1] images would otherwise be clamped silently into nonsense
        raise NitroFusionError(f"images must be in [0, 1] (got values from {lo:.2f} to {hi:.2f}); "
                               "convert [-1, 1] images with (x + 1) / 2")
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


# ---- reference images ----------------------------------------------------------------------------------------


def reference_paths(folder: str | Path, files: Sequence[str] | None = None) -> list[Path]:
    """The reference images: `files` inside `folder` (all must exist), or every image file in it, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NitroFusionError(f"reference folder not found: {folder}; give the folder of reference images "
                               "(for COCO-5k: the val2014 images)")
    if files is not None:
        paths = [folder / f for f in files]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise NitroFusionError(f"{len(missing)} reference image(s) missing, e.g. {missing[0]}; give the folder "
                                   "holding the captions file's images")
    else:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise NitroFusionError(f"no reference images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def read_reference_image(path: Path, size: int) -> Tensor:
    """[3, size, size] uint8: centre-cropped to a square, then bicubic-resized."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise NitroFusionError(f"cannot read reference image {path} ({describe(e)}); replace or remove it") from None


def iter_reference(paths: Sequence[Path], size: int, batch_size: int) -> Iterable[Tensor]:
    for start in range(0, len(paths), batch_size):
        yield torch.stack([read_reference_image(p, size) for p in paths[start:start + batch_size]])


# ---- the metrics ------------------------------------------------------------------------------------------------


class RealMetrics:
    """Streaming CLIP score, FID, FD-CLIP, LAION aesthetic and ImageReward. Models load at construction (so a bad
    path fails before generation); reference features are computed once (`prepare_reference`, or the first
    `compute`) and kept across `reset()`, so one instance scores several step counts against one reference."""

    def __init__(self, cfg: RealMetricsConfig | None = None) -> None:
        cfg = cfg or RealMetricsConfig()
        if cfg.batch_size < 1:
            raise NitroFusionError(f"metrics batch size must be >= 1 (got {cfg.batch_size})")
        if cfg.reference_size < 32:
            raise NitroFusionError(f"reference size must be >= 32 pixels (got {cfg.reference_size})")
        if bool(cfg.aesthetic) != bool(cfg.aesthetic_clip):
            given, other = ("--aesthetic", "--aesthetic-clip") if cfg.aesthetic else ("--aesthetic-clip",
                                                                                      "--aesthetic")
            raise NitroFusionError(f"{given} needs {other} too: the LAION aesthetic predictor (MLP weights) reads "
                                   "CLIP ViT-L/14 image embeddings (openai/clip-vit-large-patch14)")
        self.cfg = cfg
        self.device = _device(cfg.device)
        self.skipped: dict[str, str] = {}
        self.weights: dict[str, str] = {}
        self._ref_paths = reference_paths(cfg.reference, cfg.reference_files) if cfg.reference else []
        self._ref_ready = False
        self._fid: Any = None
        self._fd_clip: Any = None
        self._clip_score: Any = None
        self._aesthetic: tuple[ClipImageFeatures, AestheticMLP] | None = None
        self._image_reward: Any = None
        self._setup_clip()
        self._setup_fid()
        self._setup_aesthetic()
        self._setup_image_reward()
        self.reset()

    # -- setup --

    def _setup_clip(self) -> None:
        cfg = self.cfg
        if not cfg.clip:
            self.skipped["clip_score"] = "no --clip model given (the paper's: openai/clip-vit-base-patch32)"
            self.skipped["fd_clip"] = "no --clip model given"
            return
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.multimodal.clip_score import CLIPScore

        model, processor = load_clip(cfg.clip, "CLIP score")
        model.to(self.device)
        context = int(model.config.text_config.max_position_embeddings)
        shim = _TensorFeatures(model)
        # the callable form: torchmetrics only accepts hub ids containing "openai"/"jinaai"/"zer0int" otherwise
        self._clip_score = CLIPScore(model_name_or_path=lambda: (shim, _TruncatingProcessor(processor, context)))
        self._clip_score.to(self.device)
        self.weights["clip_score"] = cfg.clip
        if not self._ref_paths:
            self.skipped["fd_clip"] = "no --reference images given"
            return
        self._fd_clip = FrechetInceptionDistance(feature=ClipImageFeatures(model, processor),
                                                 reset_real_features=False).to(self.device)
        self.weights["fd_clip"] = cfg.clip

    def _setup_fid(self) -> None:
        cfg = self.cfg
        if not cfg.inception:
            self.skipped["fid"] = ("no --inception weights given (torch-fidelity's "
                                   "weights-inception-2015-12-05-6726825d.pth)")
            return
        if not Path(cfg.inception).is_file():
            raise NitroFusionError(f"Inception weights not found: {cfg.inception}; give torch-fidelity's "
                                   "weights-inception-2015-12-05-6726825d.pth")
        if not self._ref_paths:
            self.skipped["fid"] = "no --reference images given"
            return
        missing = _torch_fidelity_missing()
        if missing:
            self.skipped["fid"] = missing
            return
        from torchmetrics.image.fid import FrechetInceptionDistance

        try:
            self._fid = FrechetInceptionDistance(feature=FID_FEATURES, reset_real_features=False,
                                                 feature_extractor_weights_path=str(cfg.inception)).to(self.device)
        except Exception as e:  # noqa: BLE001 - a wrong file surfaces as pickle, key or shape errors
            raise NitroFusionError(f"cannot load Inception weights {cfg.inception} ({describe(e)}); give "
                                   "torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from None
        self.weights["fid"] = cfg.inception

    def _setup_aesthetic(self) -> None:
        cfg = self.cfg
        if not cfg.aesthetic:
            self.skipped["aesthetic"] = ("no --aesthetic weights given (LAION sac+logos+ava1-l14-linearMSE.pth, with "
                                         "--aesthetic-clip openai/clip-vit-large-patch14)")
            return
        mlp = load_aesthetic_mlp(cfg.aesthetic)
        model, processor = load_clip(cfg.aesthetic_clip, "the aesthetic predictor")
        dim = int(model.config.projection_dim)
        if dim != mlp.input_size:
            raise NitroFusionError(f"the aesthetic predictor {cfg.aesthetic} reads {mlp.input_size}-d CLIP embeddings "
                                   f"but --aesthetic-clip {cfg.aesthetic_clip} gives {dim}-d; use the CLIP it was "
                                   "trained on (ViT-L/14: openai/clip-vit-large-patch14, 768-d)")
        self._aesthetic = (ClipImageFeatures(model, processor).to(self.device), mlp.to(self.device))
        self.weights["aesthetic"] = f"{cfg.aesthetic} + {cfg.aesthetic_clip}"

    def _setup_image_reward(self) -> None:
        cfg = self.cfg
        if not cfg.image_reward:
            self.skipped["image_reward"] = "no --image-reward checkpoint given (ImageReward.pt, or ImageReward-v1.0)"
            return
        missing = _image_reward_missing()
        if missing:
            self.skipped["image_reward"] = missing
            return
        import ImageReward as RM

        try:
            self._image_reward = RM.load(cfg.image_reward, device=str(self.device))
        except Exception as e:  # noqa: BLE001 - the package raises RuntimeError, OSError, download errors
            raise NitroFusionError(f"cannot load ImageReward {cfg.image_reward!r} ({describe(e)}); give the "
                                   "ImageReward.pt file, or ImageReward-v1.0 on a connected machine") from None
        self.weights["image_reward"] = cfg.image_reward

    # -- streaming --

    def reset(self) -> None:
        """Forget the generated images (keep the models and the reference features)."""
        for metric in (self._clip_score, self._fid, self._fd_clip):
            if metric is not None:
                metric.reset()
        self.n = 0
        self._sums = {"aesthetic": 0.0, "image_reward": 0.0}

    @torch.no_grad()
    def prepare_reference(self) -> None:
        """Reference-image features for FID / FD-CLIP, read once in batches (call it before generating to find a
        bad reference image early)."""
        fids = [m for m in (self._fid, self._fd_clip) if m is not None]
        if self._ref_ready or not fids:
            return
        for batch in iter_reference(self._ref_paths, self.cfg.reference_size, self.cfg.batch_size):
            batch = batch.to(self.device)
            for metric in fids:
                metric.update(batch, real=True)
        self._ref_ready = True

    @torch.no_grad()
    def update(self, images: Tensor | Sequence[Any], prompts: Sequence[str]) -> None:
        """Score a batch: [B, 3, H, W] floats in [0, 1] (or uint8, or PIL images) and their B prompts."""
        images = to_uint8(images)
        if len(prompts) != len(images):
            raise NitroFusionError(f"{len(images)} images but {len(prompts)} prompts in one batch")
        step = self.cfg.batch_size
        for start in range(0, len(images), step):
            self._update(images[start:start + step], list(prompts[start:start + step]))
        self.n += len(images)

    def _update(self, images: Tensor, prompts: list[str]) -> None:
        on_device = images.to(self.device)
        if self._clip_score is not None:
            self._clip_score.update(on_device, prompts)
        for metric in (self._fid, self._fd_clip):
            if metric is not None:
                metric.update(on_device, real=False)
        if self._aesthetic is not None:
            clip, mlp = self._aesthetic
            scores = mlp(F.normalize(clip(images), dim=-1))
            self._sums["aesthetic"] += scores.double().sum().item()
        if self._image_reward is not None:
            from PIL import Image

            for image, prompt in zip(images, prompts, strict=True):
                pil = Image.fromarray(image.permute(1, 2, 0).numpy())
                self._sums["image_reward"] += float(self._image_reward.score(prompt, pil))

    def compute(self) -> dict[str, dict[str, Any]]:
        """{metric: {"value", "n", "library", "weights"[, "reference_n", "note"]} or {"skipped": reason}}."""
        if self.n == 0:
            raise NitroFusionError("no images were given to the metrics")
        self.prepare_reference()
        n, out = self.n, {}
        for name in METRICS:
            if name in self.skipped:
                out[name] = {"skipped": self.skipped[name]}
        if self._clip_score is not None:
            # the paper's number is the raw mean cosine; torchmetrics reports max(100 * mean, 0)
            value = (self._clip_score.score / self._clip_score.n_samples / 100).item()
            out["clip_score"] = {"value": value, "n": n, "library": "torchmetrics CLIPScore (transformers CLIP), "
                                 "reported as raw mean cosine = torchmetrics score / 100, unclamped"}
        for name, metric, library in (
                ("fid", self._fid, "torchmetrics FrechetInceptionDistance (torch-fidelity InceptionV3, 2048-d)"),
                ("fd_clip", self._fd_clip, "torchmetrics FrechetInceptionDistance on CLIP image embeddings "
                                           "(FD-CLIP, not Inception FID)")):
            if metric is None:
                continue
            if n < 2:
                out[name] = {"skipped": f"needs at least 2 generated images (got {n})"}
                continue
            ref_n = int(metric.real_features_num_samples)
            row = {"value": float(metric.compute()), "n": n, "reference_n": ref_n, "library": library}
            dim = int(metric.real_features_sum.shape[0])
            if min(n, ref_n) <= dim:
                row["note"] = (f"fewer samples than the {dim} feature dimensions: the estimate is biased high; "
                               "the paper uses 5000")
            out[name] = row
        if self._aesthetic is not None:
            out["aesthetic"] = {"value": self._sums["aesthetic"] / n, "n": n,
                                "library": "LAION improved-aesthetic-predictor MLP on L2-normalised transformers "
                                           "CLIP image embeddings"}
        if self._image_reward is not None:
            out["image_reward"] = {"value": self._sums["image_reward"] / n, "n": n,
                                   "library": "image-reward package (ImageReward.load, model.score)"}
        for name, weights in self.weights.items():
            if "value" in out.get(name, {}):
                out[name]["weights"] = weights
        return {name: out[name] for name in METRICS}


def evaluate_images(images: Iterable[Tensor | Sequence[Any]], prompts: Sequence[str],
                    cfg: RealMetricsConfig | None = None, metrics: RealMetrics | None = None) -> dict[str, dict]:
    """Score image batches (any source: a generator of [B, 3, H, W] tensors in [0, 1] or of PIL lists) against
    `prompts` in order. Pass `metrics` (then `cfg` is not used) to reuse loaded models and reference features
    across calls, e.g. one per step count."""
    metrics = metrics or RealMetrics(cfg)
    metrics.reset()
    metrics.prepare_reference()  # before the first image: a bad reference image must not waste a generation run
    seen = 0
    for batch in images:
        count = len(batch)
        if seen + count > len(prompts):
            raise NitroFusionError(f"more images than prompts ({len(prompts)}): one image per prompt")
        metrics.update(batch, prompts[seen:seen + count])
        seen += count
    if seen != len(prompts):
        raise NitroFusionError(f"{seen} images for {len(prompts)} prompts: one image per prompt")
    return metrics.compute()


# ---- COCO-5k captions --------------------------------------------------------------------------------------------


def coco_captions(path: str | Path, n: int = 5000, seed: int = 0) -> list[tuple[str, str]]:
    """n (caption, image file name) pairs from a COCO captions annotation file (captions_val2014.json /
    captions_val2017.json): n distinct images drawn with `seed`, one of each image's captions drawn with it too."""
    path = Path(path)
    if n < 1:
        raise NitroFusionError(f"the number of COCO captions must be >= 1 (got {n})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in sorted(data["annotations"], key=lambda a: (int(a["image_id"]), int(a.get("id", 0)))):
            text = " ".join(str(ann["caption"]).split())
            if text:
                captions.setdefault(int(ann["image_id"]), []).append(text)
    except FileNotFoundError:
        raise NitroFusionError(f"COCO captions file not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NitroFusionError(f"{path} is not a COCO captions annotation file ({describe(e)}); give "
                               "annotations/captions_val2014.json") from None
    ids = sorted(i for i in captions if i in files)  # sorted first: the draw must not depend on file order
    if len(ids) < n:
        raise NitroFusionError(f"{path} has {len(ids)} captioned images, fewer than the {n} asked; ask for fewer")
    rng = random.Random(seed)
    return [(rng.choice(captions[i]), files[i]) for i in rng.sample(ids, n)]


def write_caption_pairs(pairs: Sequence[tuple[str, str]], path: str | Path) -> None:
    """The chosen set as a TSV with a header (file_name, caption), so the exact protocol can be reused."""
    from ..io import atomic_write_text

    rows = ["file_name\tcaption", *(f"{f}\t{' '.join(c.split())}" for c, f in pairs)]
    atomic_write_text(path, "\n".join(rows) + "\n")


def read_caption_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(caption, file_name) pairs from a TSV written by write_caption_pairs (file_name<TAB>caption per line)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except FileNotFoundError:
        raise NitroFusionError(f"captions file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NitroFusionError(f"cannot read captions file {path} ({describe(e)})") from None
    pairs = []
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip() or (number == 1 and row == ["file_name", "caption"]):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise NitroFusionError(f"{path} line {number}: expected 'file_name<TAB>caption'")
        pairs.append((row[1].strip(), row[0].strip()))
    if not pairs:
        raise NitroFusionError(f"no captions in {path}")
    return pairs


def load_caption_pairs(path: str | Path, n: int = 5000, seed: int = 0) -> list[tuple[str, str]]:
    """COCO annotation JSON (drawn with n, seed) or a file_name<TAB>caption TSV (taken whole)."""
    return coco_captions(path, n, seed) if Path(path).suffix.lower() == ".json" else read_caption_pairs(path)
