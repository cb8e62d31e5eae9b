"""Strict, frozen configuration dataclasses read from YAML: the one builder every config file goes through.

An unknown key, a missing required key or a value of the wrong type is a `ConfigError` naming the file and
the key; a value a dataclass rejects in `__post_init__` is re-raised naming the file. Bottom layer: imports
nothing of the project.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from util.errors import ProjectError


class ConfigError(ProjectError, ValueError):
    """A configuration file or value is invalid; the message names the file and the key."""


def check_type(name: str, value: Any, tp, where: str):
    """`value` checked against a simple annotation (int/float/bool/str/Optional[...]); ints widen to float."""
    if get_origin(tp) is Union:
        if value is None and type(None) in get_args(tp):
            return value
        tp = next(a for a in get_args(tp) if a is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: key '{name}' must be {tp.__name__}, got {type(value).__name__} ({value!r})")
    return value


def build(cls, data: dict, where: str, hints: Optional[dict] = None):
    """Instantiate the frozen dataclass `cls` from a mapping, strictly. `hints` maps a retired key to advice."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    types = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in data.items():
        if k not in fields:
            advice = f"; {hints[k]}" if hints and k in hints else f" (known: {', '.join(sorted(fields))})"
            raise ConfigError(f"{where}: unknown key '{k}'{advice}")
        if dataclasses.is_dataclass(types[k]):
            kw[k] = build(types[k], v, f"{where} [{k}]")
        else:
            kw[k] = check_type(k, v, types[k], where)
    missing = [n for n, f in fields.items() if n not in kw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key '{missing[0]}'")
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def read_yaml(path) -> dict:
    """A YAML mapping from a file; ConfigError naming the file when it is missing or not valid YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys, got {type(data).__name__}")
    return data


def as_dict(cfg) -> dict:
    """A config dataclass as plain nested dicts (what is saved next to the results)."""
    return dataclasses.asdict(cfg)
