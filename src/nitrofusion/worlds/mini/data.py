"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files), validated on read."""

from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ...data.pairs import Pairs
from ...errors import NitroFusionError

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ...method.adapter import ModelAdapter

DATA_DIR = Path(os.environ.get("NITROFUSION_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle boot")
FIX = "install it with: apt-get install dataset-fashion-mnist"
_SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
           "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000)}


def class_prompts() -> list[str]:
    return [f"a photo of a {name}" for name in CLASSES]


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    if not path.is_file():
        raise NitroFusionError(f"Fashion-MNIST file missing: {path}; {FIX}")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise NitroFusionError(f"Fashion-MNIST file corrupt ({e}): {path}; reinstall: "
                               "apt-get install --reinstall dataset-fashion-mnist") from None
    if len(raw) < 4 + 4 * dims or struct.unpack(">I", raw[:4])[0] != magic:
        raise NitroFusionError(f"Fashion-MNIST file has a bad IDX header: {path}; reinstall: "
                               "apt-get install --reinstall dataset-fashion-mnist")
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    body = raw[4 + 4 * dims:]
    if len(body) != int(np.prod(shape)):
        raise NitroFusionError(f"Fashion-MNIST file truncated ({len(body)} bytes for shape {shape}): {path}; "
                               "reinstall: apt-get install --reinstall dataset-fashion-mnist")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


@lru_cache(maxsize=4)
def load_split(split: str, resolution: int = 16, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] as float32 [N, 1, R, R] and int64 labels [N]."""
    if split not in _SPLITS:
        raise NitroFusionError(f"unknown Fashion-MNIST split '{split}' (use train or test)")
    base = Path(root) if root else DATA_DIR
    img_name, lbl_name, count = _SPLITS[split]
    images = _read_idx(base / img_name, 0x00000803, 3)
    labels = _read_idx(base / lbl_name, 0x00000801, 1)
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise NitroFusionError(f"Fashion-MNIST {split} split has shape {images.shape}/{labels.shape}, "
                               f"expected ({count}, 28, 28); reinstall the package")
    if labels.max() >= len(CLASSES):
        raise NitroFusionError(f"Fashion-MNIST {split} labels out of range in {base / lbl_name}")
    x = torch.from_numpy(images.copy()).float().div(255.0).unsqueeze(1)
    if resolution != 28:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.mul(2).sub(1).clamp(-1, 1).contiguous(), torch.from_numpy(labels.astype(np.int64))


def mini_real_pairs(adapter: ModelAdapter, count: int = 0, seed: int = 0) -> Pairs:
    """Fashion-MNIST train images (at the teacher's resolution) with their class prompts."""
    from ...data.real_data import real_noise

    images, labels = load_split("train", adapter.latent_shape()[-1])
    if count:
        images, labels = images[:count], labels[:count]
    names = class_prompts()
    return Pairs(real_noise(len(images), adapter.latent_shape(), seed), images, [names[i] for i in labels.tolist()])
