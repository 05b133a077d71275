"""Streamed prompt sources for distillation: text, CSV/TSV, JSON Lines, a `datasets` folder or a Hub dataset.

Distillation needs prompts only, and users bring up to a million of them, so nothing here holds a whole
source in memory: each pass re-reads the source line by line (or batch by batch), and `take` serves any
window of the source repeated forever by skipping ahead in a fresh pass (or resuming the last one).
Bad lines are skipped and counted in `PromptStats`, never fatal; a source with no usable prompt at all is.
"""

from __future__ import annotations

import csv
import enum
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, NitroFusionError

DEFAULT_COLUMNS = ("prompt", "caption", "text")
# A line this many bytes long can't be a prompt of max_chars characters (UTF-8: at most 4 bytes each, plus
# slack for padding); reading stops there so a file without newlines never lands in memory whole.
_TEXT_SLACK_BYTES = 4096
# JSON Lines records may carry big extra fields (metadata, even base64 images), so their cap is generous.
_JSONL_LINE_CAP = 64 << 20
_BATCH = 1024


class _Bad(enum.Enum):
    UNDECODABLE = "undecodable"
    OVERLONG = "overlong"


_Record = str | _Bad


@dataclass
class PromptStats:
    """What one pass over a source used and skipped, for the user to see."""

    used: int = 0
    empty: int = 0
    overlong: int = 0
    undecodable: int = 0

    def skipped(self) -> str:
        parts = [f"{n} {what}" for what, n in (("empty", self.empty), ("overlong", self.overlong),
                                                ("undecodable", self.undecodable)) if n]
        return ", ".join(parts)

    def summary(self) -> str:
        head = f"{self.used} prompt{'' if self.used == 1 else 's'}"
        skipped = self.skipped()
        return f"{head} (skipped: {skipped})" if skipped else head


@dataclass
class _Cursor:
    # Where the last take() stopped, so sequential takes (the trainer's pattern) continue a pass in O(n).
    identity: str
    pos: int
    it: Iterator[str]


class PromptSource:
    """A re-readable stream of prompts. Subclasses yield raw records; this class filters and counts them."""

    kind = "abstract"

    def __init__(self, where: str, max_chars: int) -> None:
        self.where = where  # what error messages call the source (its path or hf:NAME)
        self.max_chars = max_chars
        self.stats = PromptStats()
        self._count: tuple[str, int] | None = None  # (identity, count) of the last full pass
        self._cursor: _Cursor | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.where}>"

    # --- for subclasses -------------------------------------------------------------------------------
    def _records(self) -> Iterator[_Record]:
        """Every record of the source in order: its prompt text (unstripped, maybe empty) or why it is bad."""
        raise NotImplementedError

    def identity(self) -> str:
        """A stable string that changes when the prompt sequence may have changed (for cache keys)."""
        raise NotImplementedError

    def _hint(self) -> str:
        return "fix the source or raise max_chars"

    # --- public ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        self.stats = PromptStats()
        return self._pass(self.stats)

    def count(self) -> int:
        """The number of valid prompts: one streaming pass (which also refreshes self.stats), cached."""
        ident = self.identity()
        if self._count is not None and self._count[0] == ident:
            return self._count[1]
        stats = PromptStats()
        for _ in self._pass(stats):
            pass
        self.stats = stats
        self._count = (ident, stats.used)
        return stats.used

    def take(self, start: int, n: int) -> list[str]:
        """Prompts start .. start+n-1 of the source repeated forever (position i is prompt i % count())."""
        if start < 0 or n < 0:
            raise NitroFusionError(f"take({start}, {n}): start and n must be >= 0; pass a position and a count")
        if n == 0:
            return []
        total = self.count()
        ident = self.identity()
        pos = start % total
        c = self._cursor
        if c is not None and c.identity == ident and c.pos == pos:
            it = c.it
        else:
            it = self._pass(PromptStats())
            next(islice(it, pos, pos), None)  # skip pos prompts without keeping them
        out: list[str] = []
        while len(out) < n:
            got = list(islice(it, n - len(out)))
            out += got
            pos += len(got)
            if len(out) < n or pos >= total:  # this pass is used up: the next one starts at prompt 0
                it, pos = self._pass(PromptStats()), 0
        self._cursor = _Cursor(ident, pos, it)
        return out

    # --- internals ------------------------------------------------------------------------------------
    def _pass(self, stats: PromptStats) -> Iterator[str]:
        for rec in self._records():
            if rec is _Bad.UNDECODABLE:
                stats.undecodable += 1
                continue
            if rec is _Bad.OVERLONG:
                stats.overlong += 1
                continue
            text = rec.strip()
            if not text:
                stats.empty += 1
            elif len(text) > self.max_chars:
                stats.overlong += 1
            else:
                stats.used += 1
                yield text
        if stats.used == 0:
            why = stats.skipped() or "it is empty"
            raise NitroFusionError(f"prompt source {self.where} has no usable prompts ({why}); {self._hint()}")


def _as_text(value: Any) -> _Record:
    # A missing or null field is an empty prompt; a number, list or dict is no prompt text at all.
    if value is None:
        return ""
    return value if isinstance(value, str) else _Bad.UNDECODABLE


def _not_found(where: str) -> NitroFusionError:
    return NitroFusionError(
        f"prompt source not found: {where}; give a .txt/.csv/.jsonl file, a datasets folder, or hf:NAME")


def _open(path: Path, **kwargs: Any) -> IO[Any]:
    try:
        return open(path, **kwargs)  # the caller's `with` closes it
    except FileNotFoundError:
        raise _not_found(str(path)) from None


def _file_identity(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _not_found(str(path)) from None
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _lines(path: Path, cap: int) -> Iterator[bytes | None]:
    """The file's lines as bytes; None for a line over cap bytes, which is skipped without being held."""
    with _open(path, mode="rb") as f:
        while line := f.readline(cap):
            if len(line) >= cap and not line.endswith(b"\n"):
                while (rest := f.readline(cap)) and not rest.endswith(b"\n"):
                    pass
                yield None
            else:
                yield line


def _decode(line: bytes, first: bool) -> str | None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff") if first else text  # a BOM is not part of the first prompt


def _pick_column(column: str, available: list[str], where: str, what: str = "column") -> str:
    if column:
        if column not in available:
            raise ConfigError(f"{what} {column!r} not in {where}; available: {', '.join(available)}; "
                              f"choose one with the column option")
        return column
    lowered = {name.lower(): name for name in reversed(available)}
    for name in DEFAULT_COLUMNS:
        if name in lowered:
            return lowered[name]
    raise ConfigError(f"{where} has no {what} named {', '.join(DEFAULT_COLUMNS)}; available: "
                      f"{', '.join(available) or 'none'}; choose one with the column option")


class TextPrompts(PromptSource):
    """One prompt per line; each line is decoded on its own so one bad line costs only itself."""

    kind = "text"

    def __init__(self, path: Path, max_chars: int) -> None:
        super().__init__(str(path), max_chars)
        self.path = path

    def identity(self) -> str:
        return f"{self.kind}:{_file_identity(self.path)}:max_chars={self.max_chars}"

    def _records(self) -> Iterator[_Record]:
        cap = 4 * self.max_chars + _TEXT_SLACK_BYTES
        for i, line in enumerate(_lines(self.path, cap)):
            if line is None:
                yield _Bad.OVERLONG
                continue
            text = _decode(line, i == 0)
            yield _Bad.UNDECODABLE if text is None else text


class CsvPrompts(PromptSource):
    """One column of a CSV or TSV file with a header row, read with the csv module row by row."""

    kind = "csv"

    def __init__(self, path: Path, column: str, max_chars: int, delimiter: str) -> None:
        super().__init__(str(path), max_chars)
        self.path = path
        self.delimiter = delimiter
        with self._open() as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
        if not header:
            raise NitroFusionError(f"{path} has no header row; its first line must name the columns, e.g. prompt")
        names = [h.strip() for h in header]
        self.column = _pick_column(column, names, str(path))
        self._index = names.index(self.column)

    def _open(self) -> IO[str]:
        # surrogateescape: a bad byte turns into a lone surrogate in its field, so only that row is skipped.
        return _open(self.path, mode="r", encoding="utf-8-sig", errors="surrogateescape", newline="")

    def identity(self) -> str:
        return f"{self.kind}:{_file_identity(self.path)}:column={self.column}:max_chars={self.max_chars}"

    def _hint(self) -> str:
        return f"check column {self.column!r} or raise max_chars"

    def _records(self) -> Iterator[_Record]:
        with self._open() as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            try:
                next(reader, None)  # header
                for row in reader:
                    if self._index >= len(row):  # blank or short row
                        yield ""
                        continue
                    field = row[self._index]
                    try:
                        field.encode("utf-8")
                    except UnicodeEncodeError:
                        yield _Bad.UNDECODABLE
                        continue
                    yield field
            except csv.Error as e:
                raise NitroFusionError(f"cannot parse {self.path} line {reader.line_num}: {e}; "
                                       f"fix its quoting or convert it to .jsonl") from None


class JsonlPrompts(PromptSource):
    """One JSON object per line; the prompt is one field of it."""

    kind = "jsonl"

    def __init__(self, path: Path, column: str, max_chars: int) -> None:
        super().__init__(str(path), max_chars)
        self.path = path
        self.column = column or self._default_column()

    def _objects(self) -> Iterator[dict[str, Any] | _Bad | None]:
        """Each line parsed: its object, a _Bad, or None for a blank line."""
        for i, line in enumerate(_lines(self.path, _JSONL_LINE_CAP)):
            if line is None:
                yield _Bad.OVERLONG
                continue
            text = _decode(line, i == 0)
            if text is None:
                yield _Bad.UNDECODABLE
                continue
            if not text.strip():
                yield None
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                yield _Bad.UNDECODABLE
                continue
            yield obj if isinstance(obj, dict) else _Bad.UNDECODABLE

    def _default_column(self) -> str:
        # The first object decides; with none at all every line is bad and the first pass says so.
        for obj in self._objects():
            if isinstance(obj, dict):
                return _pick_column("", list(obj), f"the first record of {self.path}", what="field")
        return DEFAULT_COLUMNS[0]

    def identity(self) -> str:
        return f"{self.kind}:{_file_identity(self.path)}:column={self.column}:max_chars={self.max_chars}"

    def _hint(self) -> str:
        return f"check field {self.column!r} or raise max_chars"

    def _records(self) -> Iterator[_Record]:
        for obj in self._objects():
            if obj is None:
                yield ""
            elif isinstance(obj, _Bad):
                yield obj
            else:
                yield _as_text(obj.get(self.column))


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise NitroFusionError("datasets folders and hf: prompt sources need the datasets package: "
                               "pip install 'nitrofusion[datasets]'") from None
    return datasets


def _column_records(batches: Iterator[dict[str, list[Any]]], column: str) -> Iterator[_Record]:
    for batch in batches:
        for value in batch[column]:
            yield _as_text(value)


class DiskDatasetPrompts(PromptSource):
    """A folder written by `datasets` save_to_disk; memory-mapped Arrow, read in batches of one column."""

    kind = "datasets"

    def __init__(self, path: Path, column: str, split: str, max_chars: int) -> None:
        super().__init__(str(path), max_chars)
        self.path = path
        datasets = _import_datasets()
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for "not a dataset folder"
            raise NitroFusionError(f"{path} is a folder but not one written by datasets save_to_disk ({e}); "
                                   f"give a .txt/.csv/.jsonl file, a datasets folder, or hf:NAME") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"split {split!r} not in {path}; available: {', '.join(ds)}; "
                                  f"choose one with the split option")
            ds, self.split = ds[split], split
        else:
            self.split = ""  # a bare Dataset has no splits
        self.column = _pick_column(column, list(ds.column_names), str(path))
        self._ds = ds.select_columns([self.column])  # other columns (images, say) are never decoded

    def identity(self) -> str:
        # save_to_disk writes several files; any of them changing changes the prompts' identity.
        h = hashlib.sha256()
        for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(self.path)}:{_file_identity(f)}\n".encode())
        return (f"{self.kind}:{self.path}:{h.hexdigest()[:16]}:split={self.split}:column={self.column}"
                f":max_chars={self.max_chars}")

    def _hint(self) -> str:
        return f"check column {self.column!r} or raise max_chars"

    def _records(self) -> Iterator[_Record]:
        return _column_records(self._ds.iter(batch_size=_BATCH), self.column)


class HubPrompts(PromptSource):
    """A Hugging Face Hub dataset, streamed (needs network access to the Hub on every pass)."""

    kind = "hf"

    def __init__(self, name: str, revision: str, column: str, split: str, max_chars: int) -> None:
        where = f"hf:{name}" + (f"@{revision}" if revision else "")
        super().__init__(where, max_chars)
        self.name, self.revision, self.split = name, revision, split
        datasets = _import_datasets()
        try:
            ds = datasets.load_dataset(name, split=split, streaming=True, revision=revision or None)
            names = ds.column_names
            if names is None:  # features unknown until a row is read
                names = list(next(iter(ds), {}))
        except Exception as e:  # network, auth, unknown name or split: all reported the same way
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NitroFusionError(f"cannot open {where} split {split!r}: {first}; check the name, split and "
                                   f"network, or save it with save_to_disk and give the folder") from None
        self.column = _pick_column(column, list(names), where)
        self._ds = ds.select_columns([self.column])

    def identity(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.kind}:{self.name}{rev}:split={self.split}:column={self.column}:max_chars={self.max_chars}"

    def _hint(self) -> str:
        return f"check column {self.column!r} or raise max_chars"

    def _records(self) -> Iterator[_Record]:
        return _column_records(self._ds.iter(batch_size=_BATCH), self.column)


def open_prompts(spec: str, column: str = "", split: str = "train", max_chars: int = 1000) -> PromptSource:
    """Open a prompt source: a .txt (or any other) file, .csv/.tsv, .jsonl, a datasets folder, or hf:NAME[@REV].

    Opening reads only what it must to check the column (a header, the first record); prompts stream later.
    """
    if not spec:
        raise ConfigError("no prompt source given; give a .txt/.csv/.jsonl file, a datasets folder, or hf:NAME")
    if max_chars < 1:
        raise ConfigError(f"max_chars must be >= 1, got {max_chars}; set it to the longest prompt to keep")
    if spec.startswith("hf:"):
        name, _, revision = spec[3:].partition("@")
        if not name:
            raise ConfigError(f"no dataset name in {spec!r}; write hf:NAME or hf:NAME@REVISION")
        return HubPrompts(name, revision, column, split, max_chars)
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise _not_found(spec)
    if path.is_dir():
        return DiskDatasetPrompts(path, column, split, max_chars)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return CsvPrompts(path, column, max_chars, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".ndjson"):
        return JsonlPrompts(path, column, max_chars)
    if column:
        raise ConfigError(f"column {column!r} given for {spec}, a plain text file with one prompt per line; "
                          f"drop the column option or use a .csv/.tsv/.jsonl file")
    return TextPrompts(path, max_chars)
