"""Hugging Face Hub ids wherever a command takes a model folder (`--teacher`, `--model`, `--base`, `--vae`, transfer's
three, a run's teacher): a value that is no path here but has a repo id's shape (`owner/name`) becomes the folder of
its snapshot in the HF cache, before anything reads the folder to tell its family.

With a network the files a loader reads are downloaded into the HF cache that diffusers' `from_pretrained(id)`
shares: the parts `model_index.json` lists, each with its configs, tokenizer files and plain weights (safetensors
where there are any), never a repo's fp16 variants, ONNX/Flax copies or single-file checkpoints (HF_TOKEN or `hf
auth login` for gated and private repos). Offline (HF_HUB_OFFLINE=1, or the Hub cannot be reached) the cached
snapshot is used as it is; an absent one is one line naming the id and how to point at a downloaded folder. Whether
a snapshot is complete is the folder checks' business (family.py), as for any folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import NitroFusionError, describe

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")  # the Hub's owner/name
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")  # a missing weights file, never a repo
# The files the model folders' kinds are told by (pipeline.model_kind): a pipeline, a UNet/transformer folder, a
# student folder; any one cached locates the snapshot.
MARKERS = ("model_index.json", "config.json", "unet/config.json", "transformer/config.json")
# The folders of a repo with no model_index.json: a UNet or transformer folder at its root, or a student's
STUDENT_FOLDERS = ("", "unet", "transformer", "scheduler")
# The weights files from_pretrained reads (no variant): plain, sharded, their index
WEIGHT_NAME = re.compile(r"(diffusion_pytorch_model|model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"
                         r"(\.index\.json)?")
WEIGHT_INDEX = re.compile(r".*\.(safetensors|bin)\.index\.json")
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs and tokenizer files (vocab, merges, sentencepiece)

_resolved: dict[str, Path] = {}  # one download or cache look-up per id and process (a command asks several times)


def is_hub_id(value: str | Path) -> bool:
    """A value that names no path here but is shaped as a Hub repo id."""
    text = str(value)
    return (REPO_ID.fullmatch(text) is not None and ".." not in text and not text.endswith(WEIGHT_SUFFIXES)
            and not Path(text).exists())


def local_model(value: str | Path, flag: str = "--model", subject: str | None = None) -> Path:
    """`value` as a local path: itself, or for a Hub id its snapshot folder (downloaded, or from the HF cache).
    `flag` is the option a downloaded folder would be given with, `subject` what the messages call the value."""
    if not is_hub_id(value):
        return Path(value)
    repo_id = str(value)
    if repo_id not in _resolved:
        _resolved[repo_id] = _snapshot(repo_id, flag, subject or f"{flag} {repo_id}".strip())
    return _resolved[repo_id]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


class _Unreachable(Exception):
    """The Hub cannot be reached (the cache may still hold the id)."""


def _snapshot(repo_id: str, flag: str, subject: str) -> Path:
    try:
        if _offline():
            raise _Unreachable("HF_HUB_OFFLINE is set")
        return _download(repo_id, _listing(repo_id, subject), subject)
    except _Unreachable as e:
        reason = str(e)
    cached = cached_snapshot(repo_id)
    if cached is None:
        give = f"give {flag} DIR" if flag.startswith("--") else "give DIR in its place"
        raise NitroFusionError(f"{subject} is no folder here, and this Hugging Face Hub id is not in the HF cache "
                               f"({reason}); download it where there is a network (`hf download {repo_id} "
                               f"--local-dir DIR`) and {give}")
    return cached


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of the id's cached snapshot (revision main), found by any file that tells a model folder's kind."""
    from huggingface_hub import try_to_load_from_cache

    for marker in MARKERS:
        hit = try_to_load_from_cache(repo_id, marker)
        if isinstance(hit, str):
            return Path(hit).parents[marker.count("/")]
    return None


def _listing(repo_id: str, subject: str) -> list[str]:
    """The repo's files (HF_TOKEN or the saved login for private and gated repos), from one request the Hub client
    does not retry: no route to the Hub is an answer in milliseconds, not half a minute of retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return [sibling.rfilename for sibling in HfApi().model_info(repo_id).siblings or []]
    except GatedRepoError:
        raise NitroFusionError(_gated(repo_id, subject)) from None
    except RepositoryNotFoundError:
        raise NitroFusionError(f"{subject} is no folder here, and no Hugging Face Hub repository of that name (a "
                               "private one needs `hf auth login` or HF_TOKEN)") from None
    except Exception as e:  # noqa: BLE001 - the Hub down or out of reach: the HTTP client's errors vary by version
        raise _Unreachable(f"the Hub cannot be reached: {describe(e)}") from None


def _gated(repo_id: str, subject: str) -> str:
    return (f"{subject} is a gated Hugging Face Hub repository: accept its terms at https://huggingface.co/{repo_id} "
            "and log in (`hf auth login`, or set HF_TOKEN)")


def loaded_files(files: list[str], folders: set[str]) -> list[str]:
    """Of a repo's `files`, those a loader reads from `folders` ("" is the root): configs and tokenizer files, and
    the plain weights files, safetensors where a folder has any, else torch files."""
    by_folder: dict[str, list[str]] = {}
    for file in files:
        folder, _, name = file.rpartition("/")
        if folder in folders:
            by_folder.setdefault(folder, []).append(name)
    wanted = []
    for folder, names in by_folder.items():
        weights = [n for n in names if WEIGHT_NAME.fullmatch(n)]
        keep = [n for n in weights if ".safetensors" in n] or weights
        keep += [n for n in names if n.endswith(CONFIG_SUFFIXES) and not WEIGHT_INDEX.fullmatch(n)]
        wanted += [f"{folder}/{n}" if folder else n for n in keep]
    return sorted(wanted)


def _download(repo_id: str, files: list[str], subject: str) -> Path:
    """The snapshot, with the files a loader reads downloaded into the HF cache (the rest of the repo is left)."""
    import json

    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError

    try:
        if "model_index.json" in files:
            index = json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text())
            parts = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
            wanted = ["model_index.json", *loaded_files(files, parts)]
        elif any(marker in files for marker in MARKERS):
            wanted = loaded_files(files, set(STUDENT_FOLDERS))
        else:
            raise NitroFusionError(f"{subject}: the Hub repository holds no diffusers pipeline (model_index.json) or "
                                   f"model folder (config.json); for one weights file in it run `hf download "
                                   f"{repo_id} FILE --local-dir DIR` and give DIR/FILE")
        return Path(snapshot_download(repo_id, allow_patterns=wanted))
    except NitroFusionError:
        raise
    except GatedRepoError:
        raise NitroFusionError(_gated(repo_id, subject)) from None
    except Exception as e:  # noqa: BLE001 - a download cut off surfaces as the HTTP client's many types
        raise NitroFusionError(f"{subject}: the download from the Hub stopped ({describe(e)}); rerun to continue it "
                               "(the HF cache keeps what arrived)") from None
