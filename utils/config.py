"""Typed configuration: dataclasses loaded from JSON, with type-checked ``--section.key=value`` overrides.

Every section is a dataclass; a run's config is a dataclass whose fields are sections (or plain values).
``load_config(RunConfig, path, ["--model.depth=16"])`` reads the JSON file, applies the overrides and returns
an instance. Unknown keys are errors that name the closest valid key; values of the wrong type are errors that
name the key, the expected type and the given value. ``to_dict`` gives back plain JSON-serialisable data
(stored in every checkpoint), and ``from_dict(cls, to_dict(cfg)) == cfg``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from utils.cli import InputError

T = TypeVar("T")


class ConfigError(InputError, ValueError):
    """A config file or override does not fit the config dataclasses."""


def check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                below_high: bool = False) -> None:
    """ConfigError naming ``key`` unless ``low <= value <= high`` (``value < high`` with ``below_high``); a bound
    left None is open; NaN is always refused. For the values a config's ``validate`` must refuse before they
    fail deep in a run."""
    too_high = high is not None and (value >= high if below_high else value > high)
    if value != value or (low is not None and value < low) or too_high:  # value != value: NaN
        lo = f"{low} <= " if low is not None else ""
        hi = (f" < {high}" if below_high else f" <= {high}") if high is not None else ""
        raise ConfigError(f"'{key}' must be {lo}{key.rsplit('.', 1)[-1]}{hi}, got {value}")


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(options))}."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert JSON forms (lists, ints) to it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"'{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a section (JSON object) of {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (tuple, list):
        if isinstance(value, str) and origin is list and args and args[0] is str:
            value = [value]  # --data.lmdb_dirs=path means a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"'{key}': expected {_type_name(tp)} (a JSON list), got {value!r} ({type(value).__name__})")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"'{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a JSON object, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}': expected bool (true/false), got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}': expected int, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"'{key}': expected float, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}': expected str, got {value!r} ({type(value).__name__})")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"'{key}': unsupported annotation {_type_name(tp)} for value {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a plain dict; missing keys keep their defaults, unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'.{_closest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default is missing
        raise ConfigError(f"section '{prefix.rstrip('.') or cls.__name__}': {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:  # name the section unless the message does ('optim.lr must ...')
            if prefix and prefix not in str(e):
                raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None
            raise
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-serialisable data (tuples become lists)."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``"section.key: old -> new"`` for every setting that differs between two ``to_dict`` results (a key
    present in one only shows as missing in the other)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def _parse_value(text: str) -> Any:
    """CLI values are JSON when they parse as JSON (numbers, true/false, null, lists), otherwise strings.

    Lists may also be written without JSON quotes: "a,b" or "[a,b]" (e.g. --data.lmdb_dirs=[/data/a,/data/b])."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if text.startswith("[") and text.endswith("]"):
            inner = text[1:-1].strip()
            return [_parse_value(x.strip()) for x in inner.split(",")] if inner else []
        if "," in text and not text.startswith("{"):
            return [_parse_value(x) for x in text.split(",")]
        return text


def _set_dotted(data: dict[str, Any], cls: type, dotted: str, raw: str) -> None:
    """Write an override into the nested dict, validating the key path against the dataclasses."""
    parts = dotted.split(".")
    node, node_cls, path = data, cls, ""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in fields:
            raise ConfigError(f"unknown config key '{path}{part}'.{_closest(part, list(fields))}")
        tp = typing.get_type_hints(node_cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"'{path}{part}' is a section; set one of its keys, e.g. --{path}{part}.KEY=VALUE")
            # A string field takes the raw text, so "--data.root=123" stays "123"; an optional one takes null as
            # None ("--text.cache_dir=null" turns the cache off instead of naming a folder "null").
            is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            base = [a for a in typing.get_args(tp) if a is not type(None)] if is_union else [tp]
            if base == [str]:
                node[part] = None if is_union and raw == "null" else raw
            else:
                node[part] = _parse_value(raw)
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"'{path}{part}' is a value, not a section")
        node = node.setdefault(part, {})
        node_cls, path = tp, f"{path}{part}."


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--a.b=1", "--c", "2"]`` → ``[("a.b", "1"), ("c", "2")]``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = arg[2:], args[i + 1]
            i += 1
        else:
            key, raw = arg[2:], "true"  # a bare flag sets a bool to true
        out.append((key.replace("-", "_"), raw))
        i += 1
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a JSON file (optional) and apply ``--key=value`` overrides (dotted for sections)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a JSON object")
    for key, raw in parse_overrides(overrides or []):
        _set_dotted(data, cls, key, raw)
    return from_dict(cls, data)
