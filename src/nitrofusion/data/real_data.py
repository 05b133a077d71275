"""Real images as the discriminator's "real" side (config `real`), beside or instead of teacher samples.

The paper's discriminator only ever sees teacher samples as real, so its student can at best match the
teacher. Where real images with prompts exist, `real.source: data` judges the student against them and
`mix` against both (`real.share` of every micro-batch real). A real row has the shape of a teacher pair
(x_T, x0, prompt) so every loader and the step take it unchanged: x0 is the real image (the VAE latent
for SDXL), x_T a seeded Gaussian the student starts from, unrelated to the image (no pairing is needed:
the adversarial loss compares distributions per prompt).

Mini world: the Fashion-MNIST train split with its class prompts (worlds/mini/data.py). The pipeline families: a
folder of images with captions
(`metadata.jsonl` with file_name and text/caption/prompt, or `NAME.txt` beside each image), encoded once
by the teacher's VAE and cached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import NitroFusionError
from ..io import atomic_save_safetensors, cache_dir, disk_errors
from ..locks import locked
from .pairs import MixedPairs, OnlinePairs, Pairs, ShardedPairs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = ("text", "caption", "prompt")


def real_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + 17))


def caption_folder(folder: Path) -> list[tuple[Path, str]]:
    """(image, caption) for every image in `folder`, in name order."""
    if not folder.is_dir():
        raise NitroFusionError(f"real.data folder not found: {folder}; give a folder of images with captions")
    meta = folder / "metadata.jsonl"
    items: list[tuple[Path, str]] = []
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
                text = next(row[k] for k in CAPTION_KEYS if k in row)
            except (json.JSONDecodeError, KeyError, StopIteration, TypeError):
                raise NitroFusionError(f"{meta} line {n}: expected a JSON object with file_name and one of "
                                       f"{', '.join(CAPTION_KEYS)}") from None
            items.append((folder / str(name), str(text)))
    else:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                raise NitroFusionError(f"image {path.name} in {folder} has no caption: add {txt.name} (or a "
                                       "metadata.jsonl with file_name and text)")
            items.append((path, txt.read_text(encoding="utf-8", errors="replace").strip()))
    if not items:
        raise NitroFusionError(f"no images with captions in {folder} ({', '.join(IMAGE_SUFFIXES)} with NAME.txt, "
                               "or metadata.jsonl)")
    return items


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """[3, R, R] in [-1, 1]: shorter side resized to R (bicubic), centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = resolution / min(im.size)
            w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise NitroFusionError(f"cannot read image {path} ({type(e).__name__}); remove or replace it") from None
    return data.view(resolution, resolution, 3).permute(2, 0, 1).float().div(127.5).sub(1)


def folder_real_pairs(adapter, folder: str | Path, resolution: int, count: int = 0, seed: int = 0,
                      batch_size: int = 8, progress: bool = True) -> Pairs:
    """Encode a caption folder with the adapter's VAE once; later runs read the cache (keyed by the files'
    names, sizes and times, the resolution and the VAE's weights)."""
    from .pairs import fingerprint

    items = caption_folder(Path(folder))
    if count:
        items = items[:count]
    h = hashlib.sha256(f"{resolution}:{fingerprint(adapter.vae)}".encode())
    for path, text in items:
        st = path.stat() if path.is_file() else None
        if st is None:
            raise NitroFusionError(f"image listed but missing: {path}")
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}:{text}".encode())
    cache = cache_dir("real") / h.hexdigest()[:16] / "latents.safetensors"
    prompts = [t for _, t in items]
    latents = _cached_latents(cache)
    if latents is None:
        # one process encodes, another that needs the same folder meanwhile waits and reads its file (the file
        # alone needs no lock: it is written by atomic rename, so a reader sees it whole or not at all)
        with locked(cache.parent / ".locks" / f"{cache.name}.lock"):
            latents = _cached_latents(cache)
            if latents is None:
                latents = _encode_folder(adapter, items, resolution, batch_size, progress)
                with disk_errors("real-image latents", cache.parent, fix="then rerun"):
                    atomic_save_safetensors({"x0": latents}, cache)
    return Pairs(real_noise(len(prompts), adapter.latent_shape(), seed), latents, prompts)


def _cached_latents(cache: Path) -> torch.Tensor | None:
    """The cached latents, or None when missing or unreadable (a damaged file is re-encoded, never trusted)."""
    from safetensors.torch import load_file

    if not cache.is_file():
        return None
    try:
        return load_file(str(cache))["x0"]
    except Exception:  # whatever safetensors raises on a damaged file
        return None


def _encode_folder(adapter, items: list[tuple[Path, str]], resolution: int, batch_size: int,
                   progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(items), batch_size), desc="encode real images", disable=not progress):
        images = torch.stack([load_image(p, resolution) for p, _ in items[i:i + batch_size]])
        out.append(adapter.encode_images(images))
    return torch.cat(out)


TeacherData = Pairs | ShardedPairs | OnlinePairs


def training_source(cfg, teacher_pairs: Callable[[], TeacherData],
                    real_pairs: Callable[[], Pairs]) -> TeacherData | MixedPairs:
    """What the discriminator calls real, per `real.source`: teacher pairs, real images with their prompts (the
    world's `real_pairs`), or both mixed; each made only when needed."""
    if cfg.real.source == "teacher":
        return teacher_pairs()
    real = real_pairs()
    if cfg.real.source == "data":
        return real
    return MixedPairs(teacher_pairs(), real, cfg.real.share)
