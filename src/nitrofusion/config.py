"""Typed configs: dataclasses, named presets (YAML files shipped in the package), dotted overrides.

A config is a tree of dataclasses. `build(cls, preset, overrides)` loads a preset, applies
`a.b=value` overrides (values parsed as YAML), and checks every key and type, so a typo fails
at once with a did-you-mean instead of being silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")
PRESET_DIR = Path(__file__).parent / "presets"


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(choices))})"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans; give the word back
            value = next((w for w in (("no", "off", "false") if not value else ("yes", "on", "true"))
                          if w in allowed), value)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def ranged(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its allowed range declared beside it (for a list: every element's range).
    `from_dict` checks it before the class's own cross-key `validate()`."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, default_factory=factory, metadata={"range": bounds})


_RANGE_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def describe_range(bounds: dict) -> str:
    return " and ".join(f"{_RANGE_WORDS[k]} {v:g}" for k, v in bounds.items())


def _in_range(value: float, bounds: dict) -> bool:
    checks = {"ge": value >= bounds.get("ge", value), "gt": "gt" not in bounds or value > bounds["gt"],
              "le": value <= bounds.get("le", value), "lt": "lt" not in bounds or value < bounds["lt"]}
    return all(checks.values()) and value == value  # NaN is never in range


def check_ranges(obj: Any, where: str = "config") -> None:
    """Every field declared with `ranged` holds a value (or, for a list, values) inside its range."""
    for f in dataclasses.fields(obj):
        bounds = f.metadata.get("range")
        if not bounds:
            continue
        value = getattr(obj, f.name)
        for v in value if isinstance(value, list | tuple) else [value]:
            if not _in_range(v, bounds):
                key = f"{where}.{f.name}".removeprefix("config.")
                raise ConfigError(f"{key} must be {describe_range(bounds)} (got {v!r})")


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (partial) mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            renamed = getattr(cls, "RENAMED", {}).get(key)
            if renamed:
                raise ConfigError(f"config key '{where}.{key}' is now {renamed}".replace("config.", ""))
            raise ConfigError(f"unknown config key '{where}.{key}'{_suggest(key, names)}".replace("config.", ""))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}".removeprefix("config."))
    obj = cls(**kwargs)
    check_ranges(obj, where)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def available_presets(kind: str) -> list[str]:
    return sorted(p.stem.removeprefix(f"{kind}-") for p in PRESET_DIR.glob(f"{kind}-*.yaml"))


def preset_description(kind: str, name: str) -> str:
    """The preset file's leading comment, as one line."""
    words = []
    for line in (PRESET_DIR / f"{kind}-{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        words.append(line.lstrip("# ").strip())
    return " ".join(w for w in words if w)


def load_preset(kind: str, name: str) -> dict:
    path = PRESET_DIR / f"{kind}-{name}.yaml"
    if not path.exists():
        names = available_presets(kind)
        raise ConfigError(f"unknown {kind} preset '{name}'{_suggest(name, names)}")
    data = yaml.safe_load(path.read_text()) or {}
    parent = data.pop("inherit", None)
    return _merge(load_preset(kind, parent), data) if parent else data


def parse_overrides(items: list[str] | None) -> dict:
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def build(cls: type[T], kind: str, preset: str | None, overrides: list[str] | None = None,
          config_file: str | Path | None = None) -> T:
    """preset (or defaults) <- YAML file <- dotted overrides, then validated into `cls`."""
    data = load_preset(kind, preset) if preset else {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys (e.g. `micro_batch: 8`), "
                              f"not a {type(loaded).__name__}")
        data = _merge(data, loaded)
    data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save(obj: Any, path: str | Path) -> None:
    """Write the resolved config atomically: a reader sees the old file or the new one, never half."""
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def load(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """A config saved by `save` (a run's config.yaml), with dotted overrides applied, validated into `cls`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}); restore it or start a new run") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a config mapping; restore it or start a new run")
    upgrade = getattr(cls, "upgrade", None)  # a file written by an older version, brought to today's keys
    return from_dict(cls, _merge(upgrade(data) if upgrade else data, parse_overrides(overrides)))


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs of the same class."""
    da, db = (to_dict(a), to_dict(b)) if prefix == "" else (a, b)
    out = []
    for key in da:
        where = f"{prefix}{key}"
        if isinstance(da[key], dict) and isinstance(db.get(key), dict):
            out += differences(da[key], db[key], f"{where}.")
        elif da[key] != db.get(key):
            out.append(where)
    return out
