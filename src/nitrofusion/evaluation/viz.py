"""Pictures for reports: labelled image grids (PNG) and training curves (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(rows: list[torch.Tensor], row_labels: list[str], scale: int = 4, pad: int = 2,
               label_width: int = 110) -> Image.Image:
    """rows: tensors [N, C, H, W] in [0, 1] with the same N; one labelled row each."""
    n, c, h, w = rows[0].shape
    H, W = h * scale, w * scale
    canvas = Image.new("RGB", (label_width + n * (W + pad) + pad, len(rows) * (H + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (imgs, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = pad + r * (H + pad)
        draw.text((4, y + H // 2 - 6), label, fill="black")
        arr = (imgs.clamp(0, 1).mul(255).round().byte().cpu().numpy())
        for i in range(n):
            tile = arr[i].transpose(1, 2, 0)
            tile = np.repeat(tile, 3, axis=2) if tile.shape[2] == 1 else tile
            img = Image.fromarray(tile).resize((W, H), Image.NEAREST)
            canvas.paste(img, (label_width + pad + i * (W + pad), y))
    return canvas


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] floats in [0, 1] (the rows `image_grid` takes)."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images]).float() / 255


def save_grid(path: str | Path, rows: list[torch.Tensor], row_labels: list[str], scale: int = 4) -> None:
    image_grid(rows, row_labels, scale).save(path)


def plot_curves(path: str | Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str,
                ylabel: str, title: str, hlines: dict[str, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    for i, (name, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, ls="--", color=f"C{i + 3}", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_images(images: list, prompts: list[str], out: Path, steps: int, seed: int, num_per_prompt: int) -> list[Path]:
    """NNNN.png (prompt, seed and steps in the PNG text) and grid.png: one row per prompt. Each file is written
    to a temporary name and renamed, so a reader never sees half a PNG."""
    from PIL.PngImagePlugin import PngInfo

    from ..io import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, prompt) in enumerate(zip(images, prompts, strict=True)):
        info = PngInfo()
        for k, v in (("prompt", prompt), ("seed", str(seed + i)), ("steps", str(steps))):
            info.add_text(k, v)
        path = out / f"{i:04d}.png"
        atomic_write(path, lambda tmp, img=img, info=info: img.save(tmp, format="PNG", pnginfo=info))
        paths.append(path)
    tiles = pil_to_tensor(images)
    tiles = tiles.view(-1, num_per_prompt, *tiles.shape[1:])
    labels = [p if len(p) <= 16 else p[:15] + "…" for p in prompts[::num_per_prompt]]
    scale = max(1, 128 // images[0].height)
    atomic_write(out / "grid.png", lambda tmp: image_grid(list(tiles), labels, scale).save(tmp, format="PNG"))
    return paths
