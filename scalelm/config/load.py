"""The config tree (config/sections.py) loaded from YAML and overridden by dotted `key=value` arguments.

    cfg = load_config("configs/tiny.yaml", ["optim.lr=3e-4", "data.train=shards/"])

A YAML file lists only what differs from the defaults. Unknown keys are errors (with a suggestion), values are
checked against the field's type, and `validate()` (config/validate.py) fills in the derived values and checks
each section's rules. Every error names the field, the bad value and the fix. An objective's own section and rules
are its own (scalelm/objectives), checked when a run picks it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from scalelm.config.sections import Config, ModelConfig
from scalelm.config.validate import validate
from scalelm.errors import ConfigError


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None,
                check: bool = True) -> Config:
    """Read a YAML config over `base` (a config as dicts; else the defaults), apply `key=value` overrides,
    validate (unless not `check`: the types alone). The file's keys replace base's, section by section."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (the presets are in configs/)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model:, train:, ...) at the top")
    raw = _merged(copy.deepcopy(base or {}), raw)
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(raw)
    return validate(cfg) if check else cfg


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: sections merge key by key, values replace."""
    for key, value in top.items():
        base[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return base


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, checking every key and value against the field types."""
    return _build(Config, raw, prefix="")


# Model fields that may differ between runs of the same weights (finetuning changes dropout)
SAME_WEIGHTS_ANYWAY = ("dropout", "attention_dropout", "init_std")


def model_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The model fields (as dicts) that make `theirs` other weights than `ours`, as "model.K=THEIRS there, OURS here".
    A field `theirs` lacks (saved by a scalelm older than the field) has its default there."""
    theirs = {**dataclasses.asdict(ModelConfig()), **theirs}
    return [f"model.{k}={theirs.get(k)!r} there, {v!r} here" for k, v in ours.items()
            if theirs.get(k) != v and k not in SAME_WEIGHTS_ANYWAY]


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (example: optim.lr=3e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    name = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}={raw!r}: expected a section of keys, e.g. {name}.{dataclasses.fields(cls)[0].name}=...")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown config key {prefix}{key}: {hint}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(raw[f.name], hints[f.name], f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _build(hints[f.name], {}, f"{prefix}{f.name}.")
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type hint `tp`, converting the obvious cases (str -> float, x -> [x])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if value is None:
        raise ConfigError(f"{key} may not be null: give a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed: use one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key) for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is not a boolean: use true or false")
    if tp in (int, float):
        # NOTE: YAML reads yes/no/on/true as booleans, and Python counts a bool as an int: refuse them here.
        number = None if isinstance(value, bool) else _number(value)
        if number is None or not math.isfinite(number) or (tp is int and not number.is_integer()):
            raise ConfigError(f"{key}={value!r} is not {'a whole number' if tp is int else 'a finite number, e.g. 3e-4'}")
        return int(number) if tp is int else number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is not a string: give a single value")
        return str(value)
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")  # a bug in this file


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())

