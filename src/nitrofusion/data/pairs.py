"""Teacher pairs (docs/method.md §2.2): for each prompt a Gaussian x_T and the teacher's multi-step sample
from that same x_T. Generated once, cached on disk in checksummed safetensors shards, read by the trainer.

Shard s is generated from its own seed (seed, s), so a cache is identical however many processes
generated it, and each process can generate a disjoint set of shards.

Two runs may share one cache folder at the same time (two `nitrofusion pairs`, or `distill` beside `pairs`): a
process holds shard s's lock (`locks.locked`, a flock the kernel drops if the process dies) while it checks, makes
and indexes s, so the other makes another shard or waits for s, never both make it. pairs.json is rewritten under
its own lock, one shard's digest at a time, so every process ends with the same index.

A run hashes each shard file once at its start (`drop_corrupt_shards`), or once when it makes or first meets it:
the digests it computed (`verified`, name -> SHA-256) are handed on to `generate_pairs`, `write_index_file` and
`load_pairs` instead of hashing the same file again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .. import faults, locks, preemption
from ..dtypes import autocast
from ..errors import NitroFusionError
from ..io import atomic_save_safetensors, atomic_write_json, cache_dir, disk_errors, tensor_bytes
from ..method.guidance import draw_scales, with_guidance
from .prompts import PromptSource
from .text_cache import PREFIX as TEXT_PREFIX

if TYPE_CHECKING:  # annotations only: importing the adapter interface loads diffusers
    from ..method.adapter import ModelAdapter

META = "pairs.json"
GUIDANCE = "guidance"  # a shard's tensor of each pair's w, when the teacher sampled each at its own scale
Prompts = list[str] | PromptSource


Guidance = torch.Tensor | None  # each row's guidance scale w (a guided student's pairs: docs/method.md §10), or None
PairBatch = tuple[torch.Tensor, torch.Tensor, list[str], Guidance]  # a loader's micro-batch: x_T, x0, prompts, w


@dataclass
class Pairs:
    """A pair set held in memory; `guidance` holds each pair's w when the teacher sampled it at its own scale."""

    x_T: torch.Tensor
    x0: torch.Tensor
    prompts: list[str]
    guidance: Guidance = None

    def __len__(self) -> int:
        return self.x_T.shape[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        return self.x_T[idx], self.x0[idx], [self.prompts[i] for i in idx.tolist()]

    def scales(self, idx: torch.Tensor) -> Guidance:
        """The rows' guidance scales w, or None for pairs made at the sampler's one scale."""
        return None if self.guidance is None else self.guidance[idx]

    @staticmethod
    def cat(parts: list[Pairs]) -> Pairs:
        """Pair sets one after another (shards in order)."""
        w = None if parts[0].guidance is None else torch.cat([p.guidance for p in parts])
        return Pairs(torch.cat([p.x_T for p in parts]), torch.cat([p.x0 for p in parts]),
                     [t for p in parts for t in p.prompts], w)


class ShardedPairs:
    """A pair set read row by row from its memory-mapped shards: a million SDXL pairs cost no RAM."""

    def __init__(self, paths: list[Path]) -> None:
        self._files = [safe_open(str(p), framework="pt") for p in paths]
        self._prompts = [json.loads(f.metadata()["prompts"]) for f in self._files]
        sizes = torch.tensor([len(p) for p in self._prompts])
        self._starts = torch.cumsum(sizes, 0) - sizes
        self._len = int(sizes.sum())
        # a few bytes per pair: read whole
        self._guidance = (torch.cat([f.get_tensor(GUIDANCE) for f in self._files])
                          if GUIDANCE in set(self._files[0].keys()) else None)

    def __len__(self) -> int:
        return self._len

    def scales(self, idx: torch.Tensor) -> Guidance:
        return None if self._guidance is None else self._guidance[idx]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        shard = torch.searchsorted(self._starts, idx, right=True) - 1
        rows = idx - self._starts[shard]
        x_T, x0, prompts = [], [], []
        for s, r in zip(shard.tolist(), rows.tolist(), strict=True):
            f = self._files[s]
            x_T.append(f.get_slice("x_T")[r:r + 1].float())
            x0.append(f.get_slice("x0")[r:r + 1].float())
            prompts.append(self._prompts[s][r])
        return torch.cat(x_T), torch.cat(x0), prompts


class ShardSubset:
    """Some shards of a pair set, addressed by the whole set's row numbers (row r is row r mod shard_size of shard
    r // shard_size): a smoke run reads the rows its budget draws, from the only shards made (`rows_read`)."""

    def __init__(self, shards: dict[int, Pairs | ShardedPairs], shard_size: int, count: int) -> None:
        self._shards, self._size, self._count = shards, shard_size, count

    def __len__(self) -> int:
        return self._count

    @property
    def held(self) -> int:
        """The pairs actually here (the shards made)."""
        return sum(len(shard) for shard in self._shards.values())

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        x_T, x0, prompts = [], [], []
        for shard, row in zip((idx // self._size).tolist(), (idx % self._size).tolist(), strict=True):
            if shard not in self._shards:
                raise NitroFusionError(f"teacher-pair row {shard * self._size + row} is in shard {shard}, which "
                                       "this run did not make; rerun without --resume to remake the pairs")
            a, b, p = self._shards[shard].batch(torch.tensor([row]))
            x_T.append(a)
            x0.append(b)
            prompts += p
        return torch.cat(x_T), torch.cat(x0), prompts

    def scales(self, idx: torch.Tensor) -> Guidance:
        ws = [self._shards[int(r) // self._size].scales(torch.tensor([int(r) % self._size])) for r in idx]
        return None if not ws or ws[0] is None else torch.cat(ws)


class GrowingPairs:
    """A pair set read shard by shard as training needs it, while later shards may still be being
    generated (the demo: a helper process makes them): `wait_for(rows)` calls each shard's `arrive()` in
    order (it blocks until that shard is written and returns it) until the first `rows` pairs are here;
    `on_complete` runs once the last shard is in. Which rows an epoch draws is fixed by the loader's
    `EpochGrowth`, never by how fast the shards came, so every machine trains the same model."""

    def __init__(self, shards: list[Callable[[], Pairs]], count: int,
                 on_complete: Callable[[], None] | None = None) -> None:
        self._pending, self._count, self._on_complete = list(shards), count, on_complete
        self._pairs: Pairs | None = None
        self.waited_seconds = 0.0  # time spent reading shards, mostly blocked on ones not yet written

    def __len__(self) -> int:
        return self._count

    def wait_for(self, rows: int) -> None:
        start = time.perf_counter()
        parts = [self._pairs] if self._pairs is not None else []
        have = len(self._pairs) if self._pairs is not None else 0
        while have < min(rows, self._count) and self._pending:
            parts.append(self._pending.pop(0)())
            have += len(parts[-1])
            if not self._pending and self._on_complete is not None:
                self._on_complete()
        if len(parts) > 1 or self._pairs is None and parts:
            self._pairs = Pairs.cat(parts)
        self.waited_seconds += time.perf_counter() - start

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        return self._pairs.batch(idx)

    def scales(self, idx: torch.Tensor) -> Guidance:
        return self._pairs.scales(idx)


@dataclass(frozen=True)
class EpochGrowth:
    """Epoch e draws from the first `start_shards + e` shards (`pairs.start_shards`): training can begin
    once the first shards exist while the rest are generated, and the data order stays a function of
    (seed, epoch) alone."""

    start_shards: int
    shard_size: int

    def rows(self, epoch: int, total: int) -> int:
        return min(total, (self.start_shards + epoch) * self.shard_size)


def fingerprint(module: torch.nn.Module) -> str:
    """Content hash of a model's weights (cheap: per-tensor float64 sums and shapes)."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.double().sum().item():.10e}:{p.double().abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def cache_key(adapter: ModelAdapter, prompts: Prompts, count: int, seed: int, shard_size: int,
              storage: torch.dtype = torch.float32, amp: torch.dtype | None = None) -> str:
    """Teacher weights, sampler, latent shape, prompts (a list's content, a source's identity), count, seed,
    shard size (shard s is drawn from its own seed, so another shard size is another pair set), and the
    precision: the storage dtype and the teacher's autocast dtype (each gives other numbers)."""
    h = hashlib.sha256()
    h.update(fingerprint(adapter.teacher_unet).encode())
    h.update(repr(adapter.sampler).encode())
    h.update(f"{count}:{seed}:{adapter.latent_shape()}".encode())
    # the defaults keep the key they had before shard sizes and precision were keyed
    if shard_size != 1000:
        h.update(f":shard_size={shard_size}".encode())
    if storage != torch.float32:
        h.update(f":storage={storage}".encode())
    if amp is not None:
        h.update(f":autocast={amp}".encode())
    if adapter.text_cache_tag():  # shards with cached prompt states are another cache than shards without
        h.update(f":text={adapter.text_cache_tag()}".encode())
    if isinstance(prompts, PromptSource):
        h.update(prompts.identity().encode())
    else:
        for p in prompts:
            h.update(p.encode() + b"\0")
    return h.hexdigest()[:16]


def pair_dir(root: str, adapter: ModelAdapter, prompts: Prompts, count: int, seed: int,
             shard_size: int = 1000, storage: torch.dtype = torch.float32, amp: torch.dtype | None = None) -> Path:
    """`root`/count-seed when a folder is configured, else the shared cache keyed by `cache_key`."""
    if root:
        return Path(root) / f"{count}-{seed}"
    return cache_dir("pairs") / cache_key(adapter, prompts, count, seed, shard_size, storage, amp)


def shard_prompts(prompts: Prompts, shard: int, shard_size: int, n: int, gen: torch.Generator) -> list[str]:
    """A short list is drawn from at random; a (streamed) source is read in order, repeated as needed."""
    if isinstance(prompts, PromptSource):
        return prompts.take(shard * shard_size, n)
    return [prompts[i] for i in torch.randint(0, len(prompts), (n,), generator=gen).tolist()]


def shard_inputs(adapter: ModelAdapter, prompts: Prompts, shard: int, n: int, seed: int, shard_size: int,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[str], Guidance]:
    """Shard `shard`'s x_T, prompts and (a sampler with a guidance range) each pair's w: drawn from the shard's own
    seed, before and without the teacher; w last, so x_T and prompts are those of the same set without it."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    x_T = torch.randn((n, *adapter.latent_shape()), generator=gen).to(dtype)
    texts = shard_prompts(prompts, shard, shard_size, n, gen)
    scale_range = adapter.sampler.guidance_range
    return x_T, texts, draw_scales(n, scale_range, gen) if scale_range else None


@dataclass
class PairInputs:
    """A pair set's inputs (x_T, prompt) without the teacher's samples: enough to evaluate a student on
    them while the teacher's half is still being generated elsewhere."""

    x_T: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return self.x_T.shape[0]


def pair_inputs(adapter: ModelAdapter, prompts: Prompts, count: int, seed: int, shard_size: int = 1000,
                dtype: torch.dtype = torch.float32) -> PairInputs:
    """The inputs `generate_pairs` draws for the same arguments, identical row for row, in no time."""
    xs, texts = [], []
    for s in range((count + shard_size - 1) // shard_size):
        x, t, _ = shard_inputs(adapter, prompts, s, min(shard_size, count - s * shard_size), seed, shard_size, dtype)
        xs.append(x)
        texts += t
    return PairInputs(torch.cat(xs), texts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _lock(out: Path, name: str) -> Path:
    """The lock file of cache file `name` (a hidden folder: globbing shard-* finds the shards alone)."""
    return out / ".locks" / f"{name}.lock"


def _drop_stale_tmp(out: Path, name: str) -> None:
    """Remove the half-written temporary files (io.atomic_write's `.NAME.*.tmp`) of a writer that was killed: the
    caller holds `name`'s lock, so no live writer of that file exists."""
    for tmp in out.glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def generate_pairs(adapter: ModelAdapter, prompts: Prompts, count: int, seed: int, out_dir: str | Path,
                   shard_size: int = 1000, batch_size: int = 250, device: str | torch.device = "cpu",
                   process_index: int = 0, num_processes: int = 1, progress: bool = True,
                   write_index: bool = True, dtype: torch.dtype = torch.float32,
                   shards: list[int] | None = None, amp: torch.dtype | None = None,
                   verified: dict[str, str] | None = None) -> Path:
    """Write this process's shards of `count` pairs to out_dir (skipping shards already present and
    intact); return out_dir. With several processes, pass write_index=False and call `write_index` on
    one process once all have finished. `shards` names the shards to write instead of "s mod
    num_processes". `dtype` is the storage dtype; x_T is rounded to it BEFORE the teacher sees it, so
    student and teacher start from the very same noise. `amp`: the teacher samples under autocast to this
    dtype; its sample leaves autocast as float32 and is rounded to `dtype` once, at the write
    (docs/architecture.md, precision). `verified`: digests this run already computed (`drop_corrupt_shards`),
    trusted instead of hashing again, and added to for every shard made or checked here. Shards another process
    holds are left for last and waited for; each shard is indexed as soon as it is written."""
    if isinstance(prompts, list) and not prompts:
        raise NitroFusionError("no prompts to generate teacher pairs from; give a non-empty prompt source")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (count + shard_size - 1) // shard_size
    mine = shards if shards is not None else [s for s in range(n_shards) if s % num_processes == process_index]
    _check_shard_size(out, shard_size)
    verified = {} if verified is None else verified
    sizes = {s: min(shard_size, count - s * shard_size) for s in mine}
    bar = tqdm(total=sum(sizes.values()), desc="teacher pairs", unit="pair", disable=not progress, dynamic_ncols=True)

    def make(s: int) -> None:
        x_T, texts, w = shard_inputs(adapter, prompts, s, sizes[s], seed, shard_size, dtype)
        x0 = _teacher_samples(adapter, x_T, texts, w, seed * 1_000_003 + s + 7, batch_size, device, amp, bar)
        faults.point("pairs-shard")  # a shard sampled, not yet written
        name = shard_name(s)
        tensors = {"x_T": x_T, "x0": x0.to(dtype)} | ({GUIDANCE: w} if w is not None else {})
        tensors |= _cacheable_text(adapter, texts, batch_size, device)
        with disk_errors("teacher pairs", out, fix="then rerun the same command (finished shards are kept)",
                         needed=tensor_bytes(tensors)):
            atomic_save_safetensors(tensors, out / name, metadata={"prompts": json.dumps(texts)},
                                    fault="pairs-shard-write")
            verified[name] = _sha256(out / name)  # read back at once, from the page cache
            _record(out, name, verified[name], count, seed, shard_size, adapter)

    def claim(s: int, wait: bool) -> bool:
        """Check shard s, and make it unless intact, holding its lock; False when another process holds it."""
        name = shard_name(s)
        with locks.locked(_lock(out, name), wait=wait) as held:
            if not held:
                return False
            if _intact(out, name, verified):
                bar.update(sizes[s])
            else:
                _drop_stale_tmp(out, name)
                make(s)
        return True

    done = 0

    def claimed(s: int, wait: bool) -> bool:
        """claim(), then a safe point: every shard done so far is whole and indexed."""
        nonlocal done
        if not claim(s, wait):
            return False
        done += 1
        if preemption.requested() and done < len(mine):
            bar.close()
            raise preemption.Preempted(f"stopped by {preemption.requested()} with {done} of this process's "
                                       f"{len(mine)} teacher-pair shards in {out}")
        return True

    # first the shards no one else is making; then wait for the rest, each of which is then made or checked once
    for s in [s for s in mine if not claimed(s, wait=False)]:
        claimed(s, wait=True)
    bar.close()
    if write_index:
        write_index_file(out, count, seed, shard_size, adapter, verified)
    return out


def _teacher_samples(adapter: ModelAdapter, x_T: torch.Tensor, texts: list[str], w: Guidance, noise_seed: int,
                     batch_size: int, device: str | torch.device, amp: torch.dtype | None, bar: tqdm) -> torch.Tensor:
    """The teacher's float32 samples from x_T, `batch_size` at a time (one noise generator for the shard), each
    row guided at its own w when `w` is given."""
    noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
    x0 = []
    for i in range(0, len(texts), batch_size):
        cond = adapter.encode_prompts(texts[i:i + batch_size])
        cond = with_guidance({k: v.to(device) for k, v in cond.items()}, None if w is None else w[i:i + batch_size])
        with autocast(device, amp):
            sample = adapter.teacher_sample(x_T[i:i + batch_size].to(device).float(), cond, generator=noise_gen)
        x0.append(sample.float().cpu())
        bar.update(min(batch_size, len(texts) - i))
    return torch.cat(x0)


@torch.no_grad()
def _cacheable_text(adapter: ModelAdapter, texts: list[str], batch_size: int,
                    device: str | torch.device) -> dict[str, torch.Tensor]:
    """The prompts' states a large text encoder gives (data/text_cache.py), stored with the shard: `text.<name>`."""
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(texts), batch_size):
        for name, states in adapter.cacheable_text(texts[i:i + batch_size]).items():
            parts.setdefault(name, []).append(states.cpu())
    return {TEXT_PREFIX + name: torch.cat(states).contiguous() for name, states in parts.items()}


def _check_shard_size(out: Path, shard_size: int) -> None:
    meta = read_index(out) if (out / META).exists() else {}
    if meta.get("shard_size", shard_size) != shard_size:
        raise NitroFusionError(f"the teacher pairs in {out} were written with pairs.shard_size={meta['shard_size']}, "
                               f"this run asks for {shard_size}; set pairs.shard_size={meta['shard_size']} or "
                               "choose another pairs.dir")


def _indexed(out: Path, name: str) -> str | None:
    """The digest pairs.json holds for `name` now (it may have changed since this run read it)."""
    return read_index(out).get("shards", {}).get(name) if (out / META).exists() else None


def _intact(out: Path, name: str, verified: dict[str, str]) -> bool:
    """Shard `name` is present and its bytes are the ones indexed (the caller holds its lock). A shard present but
    not indexed is remade, as a run killed between writing and indexing it leaves it: nothing vouches for it."""
    path = out / name
    want = _indexed(out, name) if path.exists() else None
    if want is None:
        return False
    digest = verified.get(name)
    if digest != want:  # not hashed by this run yet (or the index moved on): hash it now, once
        digest = _sha256(path)
    if digest != want:
        return False
    verified[name] = digest
    return True


def _meta(count: int, seed: int, shard_size: int, adapter: ModelAdapter, shards: dict[str, str]) -> dict:
    return {"count": count, "seed": seed, "shard_size": shard_size, "sampler": adapter.sampler.describe(),
            "shards": shards}


def _write_meta(out: Path, meta: dict) -> None:
    """Write pairs.json (the caller holds its lock), shards in name order: every process writes the same bytes."""
    meta["shards"] = dict(sorted(meta["shards"].items(), key=lambda kv: (len(kv[0]), kv[0])))  # shard order
    _drop_stale_tmp(out, META)
    atomic_write_json(out / META, meta)


def _record(out: Path, name: str, digest: str, count: int, seed: int, shard_size: int, adapter: ModelAdapter) -> None:
    """Add one shard's digest to pairs.json, under the index's lock (another process may be adding its own)."""
    with locks.locked(_lock(out, META)):
        shards = read_index(out).get("shards", {}) if (out / META).exists() else {}
        _write_meta(out, _meta(count, seed, shard_size, adapter, {**shards, name: digest}))


def write_index_file(out: Path, count: int, seed: int, shard_size: int, adapter: ModelAdapter,
                     verified: dict[str, str] | None = None) -> None:
    """pairs.json: the checksum of every shard present (the loader refuses a cache with shards missing). `verified`:
    digests this run computed from the very files (`generate_pairs`), used instead of hashing them again."""
    verified = verified or {}
    n_shards = (count + shard_size - 1) // shard_size
    with locks.locked(_lock(out, META)):
        shards = {}
        for s in range(n_shards):
            p = out / shard_name(s)
            if p.exists():
                shards[p.name] = verified.get(p.name) or _sha256(p)
        _write_meta(out, _meta(count, seed, shard_size, adapter, shards))


def read_index(out: Path) -> dict:
    try:
        return json.loads((out / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NitroFusionError(f"teacher-pair cache index unreadable ({e}): {out / META}; delete the folder "
                               "to regenerate it") from None


def load_shard(out_dir: str | Path, shard: int) -> Pairs:
    """One shard, read into memory (a shard a trainer waited for, before the index lists it)."""
    return _read_shard(Path(out_dir) / shard_name(shard))


def _read_shard(path: Path) -> Pairs:
    with safe_open(str(path), framework="pt") as f:
        w = f.get_tensor(GUIDANCE) if GUIDANCE in set(f.keys()) else None
        return Pairs(f.get_tensor("x_T").float(), f.get_tensor("x0").float(), json.loads(f.metadata()["prompts"]), w)


def load_pairs(out_dir: str | Path, verify: bool = True, in_memory: bool = True,
               shards: list[int] | None = None,
               verified: dict[str, str] | None = None) -> Pairs | ShardedPairs | ShardSubset:
    """Read the cache (into memory, or as memory-mapped shards); a shard whose checksum does not match
    is an error (regenerate it). `shards`: only these shards of the set (a smoke run's, `rows_read`), which
    may be all the cache holds yet, read as a `ShardSubset` of the whole set. `verified`: digests this run
    computed from the very files moments ago (`generate_pairs`), checked against the index without hashing again."""
    out = Path(out_dir)
    meta = read_index(out)
    names = sorted(meta["shards"]) if shards is None else [shard_name(s) for s in shards]
    paths = []
    for name in names:
        path = out / name
        if name not in meta["shards"] or not path.exists() or (verify and not _matches(path, meta["shards"][name],
                                                                                           verified)):
            raise NitroFusionError(f"teacher-pair shard missing or corrupt: {path}; rerun the same command "
                                   "to regenerate it")
        paths.append(path)
    if not paths:
        raise NitroFusionError(f"teacher-pair cache is empty: {out}")
    if shards is not None:
        read = _read_shard if in_memory else (lambda path: ShardedPairs([path]))
        return ShardSubset({s: read(p) for s, p in zip(shards, paths, strict=True)}, meta["shard_size"], meta["count"])
    pairs = Pairs.cat([_read_shard(p) for p in paths]) if in_memory else ShardedPairs(paths)
    if len(pairs) != meta["count"]:
        raise NitroFusionError(f"teacher-pair cache {out} holds {len(pairs)} pairs, expected {meta['count']}; "
                               "rerun the same command to finish it")
    return pairs


def _matches(path: Path, want: str, verified: dict[str, str] | None) -> bool:
    return (verified or {}).get(path.name) == want or _sha256(path) == want


def drop_corrupt_shards(out: Path) -> dict[str, str]:
    """Delete every indexed shard whose bytes are not the ones indexed (it is remade); return the digests of those
    that are (name -> SHA-256: `verified` for the rest of this run start). A shard another process holds is
    skipped: that process leaves it whole, and `generate_pairs` checks it later under its lock."""
    verified: dict[str, str] = {}
    if not (out / META).exists():
        return verified
    for name, digest in read_index(out).get("shards", {}).items():
        p = out / name
        with locks.locked(_lock(out, name), wait=False) as held:
            if not held or not p.exists():
                continue
            actual = _sha256(p)
            if actual == digest or actual == _indexed(out, name):  # the index read first may be older than the shard
                verified[name] = actual
            else:
                p.unlink()
    return verified


def verify_and_repair(adapter: ModelAdapter, prompts: Prompts, count: int, seed: int, out_dir: str | Path,
                      in_memory: bool = True, **kw) -> Pairs | ShardedPairs:
    """Generate what is missing (corrupt shards are regenerated), then load (single process)."""
    out = Path(out_dir)
    verified = drop_corrupt_shards(out)
    generate_pairs(adapter, prompts, count, seed, out, verified=verified, **kw)
    return load_pairs(out, in_memory=in_memory, verified=verified)


class PairLoader:
    """Shuffled micro-batches over a pair set; the order of epoch e depends only on (seed, e), so the
    position (epoch, index) is the whole state needed to resume exactly."""

    def __init__(self, pairs: Pairs | ShardedPairs | GrowingPairs, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, growth: EpochGrowth | None = None) -> None:
        first = growth.rows(0, len(pairs)) if growth else len(pairs)
        if first < batch_size * world:
            raise NitroFusionError(f"only {first} teacher pairs for micro-batch {batch_size} x {world} "
                                   "processes; generate more pairs (or raise pairs.start_shards) or lower the "
                                   "batch size")
        self.pairs, self.batch_size, self.seed, self.rank, self.world = pairs, batch_size, seed, rank, world
        self.growth = growth
        self.epoch, self.position = 0, 0
        self._perm = self._order(0)

    def _order(self, epoch: int) -> torch.Tensor:
        rows = self.growth.rows(epoch, len(self.pairs)) if self.growth else len(self.pairs)
        if isinstance(self.pairs, GrowingPairs):
            self.pairs.wait_for(rows)
        return torch.randperm(rows, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._order(self.epoch)

    def next_rows(self) -> torch.Tensor:
        """The rows of this rank's next micro-batch (the loader's whole state moves on)."""
        step = self.batch_size * self.world
        if self.position + step > len(self._perm):
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._order(self.epoch)
        start = self.position + self.rank * self.batch_size
        idx = self._perm[start:start + self.batch_size]
        self.position += step
        return idx

    def next(self) -> PairBatch:
        rows = self.next_rows()
        return (*self.pairs.batch(rows), self.pairs.scales(rows))


@dataclass(frozen=True)
class _Rows:
    """A pair set's length alone: what `rows_read` runs the loaders over."""

    count: int

    def __len__(self) -> int:
        return self.count


def rows_read(count: int, batch_size: int, micro_batches: int, seed: int, world: int = 1,
              growth: EpochGrowth | None = None) -> set[int]:
    """The rows of a `count`-pair set that `micro_batches` micro-batches of every rank draw: the loaders' own
    order, run without data. A budget shorter than the set reads a random part of it; making only the shards
    of those rows keeps the run, and a resume to a longer budget, bit for bit what they are with every shard."""
    rows: set[int] = set()
    for rank in range(world):
        loader = PairLoader(_Rows(count), batch_size, seed, rank, world, growth)
        for _ in range(micro_batches):
            rows.update(loader.next_rows().tolist())
    return rows


@dataclass
class OnlinePairs:
    """Teacher pairs sampled during training (docs/method.md §2.2 allows online or cached): no cache on disk."""

    adapter: ModelAdapter
    prompts: Prompts
    seed: int = 0
    amp: torch.dtype | None = None  # the teacher samples under autocast to this dtype (mixed_precision)


class OnlinePairLoader:
    """Micro-batch k of rank r: prompts k*world+r of the source (in order) and x_T from seed (seed, k, r),
    sampled by the teacher now. The batch counter is the whole state needed to resume exactly."""

    def __init__(self, data: OnlinePairs, batch_size: int, rank: int = 0, world: int = 1,
                 device: str | torch.device = "cpu") -> None:
        self.data, self.batch_size, self.rank, self.world, self.device = data, batch_size, rank, world, device
        self.position = 0

    def state(self) -> dict:
        return {"epoch": 0, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.position = int(state["position"])

    @torch.no_grad()
    def next(self) -> PairBatch:
        k = self.position * self.world + self.rank
        gen = torch.Generator().manual_seed(self.data.seed * 1_000_003 + k)
        x_T = torch.randn((self.batch_size, *self.data.adapter.latent_shape()), generator=gen)
        texts = shard_prompts(self.data.prompts, k, self.batch_size, self.batch_size, gen)
        scale_range = self.data.adapter.sampler.guidance_range
        w = draw_scales(self.batch_size, scale_range, gen) if scale_range else None
        cond = {k_: v.to(self.device) for k_, v in self.data.adapter.encode_prompts(texts).items()}
        cond = with_guidance(cond, w)
        noise_gen = torch.Generator(device=self.device).manual_seed(self.data.seed * 1_000_003 + k + 7)
        with autocast(self.device, self.data.amp):
            x0 = self.data.adapter.teacher_sample(x_T.to(self.device), cond, generator=noise_gen)
        x0 = x0.float()
        self.position += 1
        return x_T, x0, texts, w


@dataclass
class MixedPairs:
    """Teacher pairs and real images with their prompts, mixed: `share` of every micro-batch is real."""

    teacher: Pairs | ShardedPairs | OnlinePairs
    real: Pairs | ShardedPairs
    share: float

    def split(self, batch_size: int) -> tuple[int, int]:
        """(teacher rows, real rows) of a micro-batch: round(share * B) real, at least one of each."""
        n_real = round(self.share * batch_size)
        if not 0 < n_real < batch_size:
            raise NitroFusionError(f"real.share {self.share} of micro_batch {batch_size} leaves "
                                   f"{n_real} real rows; each micro-batch needs both kinds: raise micro_batch "
                                   "or pick a share nearer 0.5")
        return batch_size - n_real, n_real


class MixLoader:
    """Micro-batch = a teacher-pair batch then a real-image batch, from two independent loaders (the real
    one seeded apart), so its state is the pair of their states."""

    def __init__(self, data: MixedPairs, batch_size: int, seed: int, rank: int, world: int,
                 device: str | torch.device = "cpu", growth: EpochGrowth | None = None) -> None:
        n_teacher, n_real = data.split(batch_size)
        self.teacher = make_loader(data.teacher, n_teacher, seed, rank, world, device, growth)
        self.real = PairLoader(data.real, n_real, seed + 104_729, rank, world)

    def state(self) -> dict:
        return {"teacher": self.teacher.state(), "real": self.real.state()}

    def load_state(self, state: dict) -> None:
        self.teacher.load_state(state["teacher"])
        self.real.load_state(state["real"])

    def next(self) -> PairBatch:
        x_T, x0, prompts, _ = self.teacher.next()  # no w: a guided student refuses real rows (worlds/mini/config.py)
        rx_T, rx0, rprompts, _ = self.real.next()
        return torch.cat([x_T, rx_T.to(x_T)]), torch.cat([x0, rx0.to(x0)]), prompts + rprompts, None


def make_loader(data: Pairs | ShardedPairs | GrowingPairs | OnlinePairs | MixedPairs, batch_size: int, seed: int,
                rank: int, world: int, device: str | torch.device = "cpu",
                growth: EpochGrowth | None = None) -> PairLoader | OnlinePairLoader | MixLoader:
    """The loader for a run's data; `growth` (teacher-pair caches only) widens each epoch by a shard."""
    if isinstance(data, MixedPairs):
        return MixLoader(data, batch_size, seed, rank, world, device, growth)
    if isinstance(data, OnlinePairs):
        return OnlinePairLoader(data, batch_size, rank, world, device)
    return PairLoader(data, batch_size, seed, rank, world, growth)


def shards_read(cfg, processes: int = 1) -> list[int] | None:
    """The teacher-pair shards a run reads, when its `max_images` budget reads fewer rows than `pairs.count` (a smoke
    run); None when it reads them all. Shard s is the same whatever else is made (its own seed), so a longer run
    later, or a resume to a longer budget, adds only the shards it lacks and trains on the very same rows."""
    p = cfg.pairs
    per_step = cfg.micro_batch * cfg.grad_accum * processes
    steps = -(-cfg.max_images // per_step)
    if not cfg.max_images or steps * per_step >= p.count:
        return None
    batch = cfg.micro_batch
    if cfg.real.source == "mix":  # the teacher's share of every micro-batch
        batch -= round(cfg.real.share * cfg.micro_batch)
    growth = EpochGrowth(p.start_shards, p.shard_size) if p.start_shards else None
    rows = rows_read(p.count, batch, steps * cfg.grad_accum, cfg.seed, processes, growth)
    shards = sorted({r // p.shard_size for r in rows})
    return None if len(shards) == p.shards else shards
