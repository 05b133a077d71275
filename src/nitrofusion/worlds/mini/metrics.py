"""Mini-world quality metrics. No Inception or CLIP weights exist here, so quality is measured with a
Fashion-MNIST classifier trained by this project:
- classifier-FID: Frechet distance between penultimate-layer features of generated images and of the
  real test set (torchmetrics' FID with the classifier as feature extractor). NOT Inception-FID.
- prompt accuracy: how often the classifier's label equals the prompt's class.
`nitrofusion classifier` trains the classifier and writes the real-data statistics."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torchmetrics.image.fid import FrechetInceptionDistance

from ...errors import NitroFusionError
from ...evaluation.manifold import per_class_coverage, precision_recall_coverage
from ...io import atomic_save_safetensors
from . import data
from .models import ClassifierFeatures, FashionClassifier

ASSET_DIR = Path(__file__).resolve().parent / "assets"
CLASSIFIER_FILE = ASSET_DIR / "classifier.safetensors"
REAL_STATS_FILE = ASSET_DIR / "real_stats.safetensors"
_FIX = "reinstall nitrofusion, or re-create it with: nitrofusion classifier --replace-shipped"


def train_classifier(out_dir: Path = ASSET_DIR, epochs: int = 6, resolution: int = 16, seed: int = 0,
                     batch_size: int = 128, log=print) -> dict:
    """Train the metric classifier on the train split; write its weights and the test split's feature stats."""
    torch.manual_seed(seed)
    x, y = data.load_split("train", resolution)
    xt, yt = data.load_split("test", resolution)
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb = x[idx]
            # small random shifts: the classifier must not be fooled by 1-pixel misalignment
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = test_accuracy(model, xt, yt)
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, test accuracy {acc:.4f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), out_dir / CLASSIFIER_FILE.name)
    stats = real_statistics(model, xt)
    atomic_save_safetensors(stats, out_dir / REAL_STATS_FILE.name)
    return {"test_accuracy": round(acc, 4), "seconds": round(time.time() - start, 1), "epochs": epochs}


@torch.no_grad()
def test_accuracy(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return (pred == y).float().mean().item()


@torch.no_grad()
def real_statistics(model: FashionClassifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums torchmetrics' FID keeps for its real side, so they can be restored without the data."""
    fid = FrechetInceptionDistance(feature=ClassifierFeatures(model), reset_real_features=False)
    for i in range(0, len(images), 1000):
        fid.update(images[i:i + 1000], real=True)
    return {"sum": fid.real_features_sum, "cov_sum": fid.real_features_cov_sum,
            "count": fid.real_features_num_samples.reshape(1)}


def load_classifier(path: Path = CLASSIFIER_FILE) -> FashionClassifier:
    if not Path(path).is_file():
        raise NitroFusionError(f"metric classifier missing: {path}; {_FIX}")
    model = FashionClassifier()
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as e:
        raise NitroFusionError(f"metric classifier unreadable ({type(e).__name__}): {path}; {_FIX}") from None
    return model.eval().requires_grad_(False)


class MiniMetrics:
    """classifier-FID (to real test set, and optionally to a reference sample set) and prompt accuracy."""

    def __init__(self, classifier: FashionClassifier | None = None, stats_path: Path = REAL_STATS_FILE) -> None:
        self.classifier = classifier or load_classifier()
        if not Path(stats_path).is_file():
            raise NitroFusionError(f"real-data statistics missing: {stats_path}; {_FIX}")
        self.real = load_file(str(stats_path))

    def _fid(self) -> FrechetInceptionDistance:
        return FrechetInceptionDistance(feature=ClassifierFeatures(self.classifier), reset_real_features=False)

    @torch.no_grad()
    def fid(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> float:
        """images in [-1, 1]; against the real test set, or against `reference` images when given."""
        metric = self._fid()
        if reference is None:
            metric.real_features_sum.copy_(self.real["sum"])
            metric.real_features_cov_sum.copy_(self.real["cov_sum"])
            metric.real_features_num_samples.fill_(int(self.real["count"].item()))
        else:
            for i in range(0, len(reference), 1000):
                metric.update(reference[i:i + 1000].float(), real=True)
        for i in range(0, len(images), 1000):
            metric.update(images[i:i + 1000].float().clamp(-1, 1), real=False)
        return float(metric.compute())

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(images[i:i + 1000].float().clamp(-1, 1))
                          for i in range(0, len(images), 1000)])

    @torch.no_grad()
    def manifold(self, images: torch.Tensor, labels: torch.Tensor, k: int = 3) -> dict:
        """Precision, recall and coverage (k-NN manifolds in the classifier's feature space) against as many
        real test images as there are samples (the first n of the test split), and each class's coverage
        by the samples prompted with that class."""
        real, real_labels = data.load_split("test")
        n = min(len(images), len(real))
        real_f, fake_f = self.features(real[:n]), self.features(images)
        out = precision_recall_coverage(real_f, fake_f, k)
        cover = per_class_coverage(real_f, real_labels[:n], fake_f, labels, len(data.CLASSES), k)
        out["class_coverage"] = [None if c is None else round(c, 4) for c in cover]
        return {key: round(v, 4) if isinstance(v, float) else v for key, v in out.items()}

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        pred = torch.cat([self.classifier(images[i:i + 1000].float().clamp(-1, 1)).argmax(1)
                          for i in range(0, len(images), 1000)])
        return (pred == labels).float().mean().item()
