"""Teacher pairs (SPEC section 2.2): for each prompt a Gaussian x_T and the teacher's multi-step sample
from that same x_T. Generated once, cached on disk in checksummed safetensors shards, read by the trainer.

Shard s is generated from its own seed (seed, s), so a cache is identical however many processes
generated it, and each process can generate a disjoint set of shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .adapters.base import ModelAdapter
from .errors import NitroFusionError
from .io import atomic_save_safetensors, atomic_write_json

META = "pairs.json"


@dataclass
class Pairs:
    x_T: torch.Tensor
    x0: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return self.x_T.shape[0]


def fingerprint(module: torch.nn.Module) -> str:
    """Content hash of a model's weights (cheap: per-tensor float64 sums and shapes)."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.double().sum().item():.10e}:{p.double().abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def cache_key(adapter: ModelAdapter, prompts: list[str], count: int, seed: int) -> str:
    h = hashlib.sha256()
    h.update(fingerprint(adapter.teacher_unet).encode())
    h.update(repr(adapter.sampler).encode())
    h.update(f"{count}:{seed}".encode())
    for p in prompts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@torch.no_grad()
def generate_pairs(adapter: ModelAdapter, prompts: list[str], count: int, seed: int, out_dir: str | Path,
                   shard_size: int = 1000, batch_size: int = 250, device: str | torch.device = "cpu",
                   process_index: int = 0, num_processes: int = 1, progress: bool = True) -> Path:
    """Write `count` pairs to out_dir (skipping shards already present and intact); return out_dir."""
    if not prompts:
        raise NitroFusionError("no prompts to generate teacher pairs from; give a non-empty prompt source")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (count + shard_size - 1) // shard_size
    mine = [s for s in range(n_shards) if s % num_processes == process_index]
    existing = _read_meta(out).get("shards", {}) if (out / META).exists() else {}
    bar = tqdm(total=sum(min(shard_size, count - s * shard_size) for s in mine), desc="teacher pairs",
               unit="pair", disable=not progress, dynamic_ncols=True)
    for s in mine:
        n = min(shard_size, count - s * shard_size)
        path = out / _shard_name(s)
        if path.exists() and existing.get(path.name) == _sha256(path):
            bar.update(n)
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + s)
        x_T = torch.randn((n, *adapter.latent_shape()), generator=gen)
        which = torch.randint(0, len(prompts), (n,), generator=gen).tolist()
        shard_prompts = [prompts[i] for i in which]
        noise_gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + s + 7)
        x0 = []
        for i in range(0, n, batch_size):
            cond = adapter.encode_prompts(shard_prompts[i:i + batch_size])
            cond = {k: v.to(device) for k, v in cond.items()}
            x0.append(adapter.teacher_sample(x_T[i:i + batch_size].to(device), cond, generator=noise_gen).float().cpu())
            bar.update(min(batch_size, n - i))
        atomic_save_safetensors({"x_T": x_T, "x0": torch.cat(x0)}, path,
                                metadata={"prompts": json.dumps(shard_prompts)})
    bar.close()
    if process_index == 0:
        _write_meta(out, count, seed, shard_size, n_shards, adapter)
    return out


def _write_meta(out: Path, count: int, seed: int, shard_size: int, n_shards: int, adapter: ModelAdapter) -> None:
    shards = {}
    for s in range(n_shards):
        p = out / _shard_name(s)
        if p.exists():
            shards[p.name] = _sha256(p)
    atomic_write_json(out / META, {"count": count, "seed": seed, "shard_size": shard_size,
                                   "sampler": adapter.sampler.describe(), "shards": shards})


def _read_meta(out: Path) -> dict:
    try:
        return json.loads((out / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NitroFusionError(f"teacher-pair cache index unreadable ({e}): {out / META}; delete the folder "
                               "to regenerate it") from None


def load_pairs(out_dir: str | Path, verify: bool = True) -> Pairs:
    """Read every shard into memory; a shard whose checksum does not match is an error (regenerate it)."""
    out = Path(out_dir)
    meta = _read_meta(out)
    xs, x0s, prompts = [], [], []
    for name, digest in sorted(meta["shards"].items()):
        path = out / name
        if not path.exists() or (verify and _sha256(path) != digest):
            raise NitroFusionError(f"teacher-pair shard missing or corrupt: {path}; rerun the same command "
                                   "to regenerate it")
        with safe_open(str(path), framework="pt") as f:
            xs.append(f.get_tensor("x_T"))
            x0s.append(f.get_tensor("x0"))
            prompts += json.loads(f.metadata()["prompts"])
    if not xs:
        raise NitroFusionError(f"teacher-pair cache is empty: {out}")
    pairs = Pairs(torch.cat(xs), torch.cat(x0s), prompts)
    if len(pairs) != meta["count"]:
        raise NitroFusionError(f"teacher-pair cache {out} holds {len(pairs)} pairs, expected {meta['count']}; "
                               "rerun the same command to finish it")
    return pairs


def verify_and_repair(adapter: ModelAdapter, prompts: list[str], count: int, seed: int, out_dir: str | Path,
                      **kw) -> Pairs:
    """Generate what is missing (corrupt shards are regenerated), then load."""
    out = Path(out_dir)
    if (out / META).exists():
        meta = _read_meta(out)
        for name, digest in meta.get("shards", {}).items():
            p = out / name
            if p.exists() and _sha256(p) != digest:
                p.unlink()
    generate_pairs(adapter, prompts, count, seed, out, **kw)
    return load_pairs(out)


class PairLoader:
    """Shuffled micro-batches over a pair set; the order of epoch e depends only on (seed, e), so the
    position (epoch, index) is the whole state needed to resume exactly."""

    def __init__(self, pairs: Pairs, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if len(pairs) < batch_size * world:
            raise NitroFusionError(f"only {len(pairs)} teacher pairs for micro-batch {batch_size} x {world} "
                                   "processes; generate more pairs or lower the batch size")
        self.pairs, self.batch_size, self.seed, self.rank, self.world = pairs, batch_size, seed, rank, world
        self.epoch, self.position = 0, 0
        self._perm = self._order(0)

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._order(self.epoch)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        step = self.batch_size * self.world
        if self.position + step > len(self._perm):
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._order(self.epoch)
        start = self.position + self.rank * self.batch_size
        idx = self._perm[start:start + self.batch_size]
        self.position += step
        return self.pairs.x_T[idx], self.pairs.x0[idx], [self.pairs.prompts[i] for i in idx.tolist()]
