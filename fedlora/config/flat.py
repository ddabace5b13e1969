"""Flatten typed config dataclasses into Flower's flat run-config, and back.

Flower's ``context.run_config`` holds only scalars (bool, int, float, str) under flat
keys. Our configs are nested frozen dataclasses (``model``, ``data``, ...). This module
is the single boundary between the two: ``flatten_config`` writes ``<group>.<field>``
keys, ``build_config`` rebuilds a dataclass (running its ``__post_init__`` validation).
Tuple fields travel as comma-separated strings because run-config has no lists.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

Scalar = bool | int | float | str
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is invalid (raised before any training)."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _tuple_item_type(tp: Any) -> Any | None:
    """Return the item type of ``tuple[X, ...]`` or None for other types."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return args[0] if args else str
    return None


def _encode(value: Any) -> Scalar:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"Cannot put {value!r} ({type(value).__name__}) in run-config")


def flatten_config(obj: Any, prefix: str = "") -> dict[str, Scalar]:
    """Flatten a (nested) config dataclass into ``{"group.field": scalar}``.

    Parameters
    ----------
    obj : dataclass instance
        The config to flatten; nested dataclass fields become key prefixes.
    prefix : str (default: "")
        Prefix for every key, e.g. ``"model."``.

    Returns
    -------
    dict[str, Scalar]
        Flat mapping, ordered as the dataclass fields are declared.
    """
    out: dict[str, Scalar] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten_config(value, prefix=f"{key}."))
        else:
            out[key] = _encode(value)
    return out


def _coerce(key: str, raw: Any, tp: Any) -> Any:
    """Coerce one raw value (from TOML, YAML or a CLI string) to the field type."""
    item = _tuple_item_type(tp)
    if item is not None:
        if isinstance(raw, (list, tuple)):
            parts = list(raw)
        elif isinstance(raw, str):
            parts = [p.strip() for p in raw.split(",") if p.strip()]
        else:
            parts = [raw]
        return tuple(_coerce(key, p, item) for p in parts)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in {"true", "false"}:
            return raw.lower() == "true"
        raise ConfigError(f"{key}={raw!r}: expected true or false")
    if tp is int:
        if isinstance(raw, bool) or not isinstance(raw, (int, str, float)):
            raise ConfigError(f"{key}={raw!r}: expected an integer")
        try:
            as_float = float(raw)
        except ValueError as err:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from err
        if as_float != int(as_float):
            raise ConfigError(f"{key}={raw!r}: expected an integer")
        return int(as_float)
    if tp is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}={raw!r}: expected a number")
        try:
            return float(raw)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}={raw!r}: expected a number") from err
    if tp is str:
        if isinstance(raw, (dict, list)):
            raise ConfigError(f"{key}={raw!r}: expected a string")
        return "" if raw is None else str(raw)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        raise ConfigError(f"{key}: optional fields are not supported in run-config")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def build_config(
    cls: type[T], values: Mapping[str, Any], prefix: str = "", strict: bool = True
) -> T:
    """Rebuild a (nested) config dataclass from a flat or nested mapping.

    Accepts both flat keys (``"model.rank"``) and nested dicts (from Hydra), so
    one function serves Flower's run-config and Hydra's composed config.

    Parameters
    ----------
    cls : type
        The dataclass to build; its ``__post_init__`` validates the values.
    values : Mapping[str, Any]
        Flat ``{"group.field": v}`` and/or nested ``{"group": {"field": v}}``.
    prefix : str (default: "")
        Only keys under this prefix are read (used for nested groups).
    strict : bool (default: True)
        Reject keys under ``prefix`` that the dataclass does not declare.

    Raises
    ------
    ConfigError
        Naming the key, the bad value and what is allowed.
    """
    flat = _to_flat(values)
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if strict:
        unknown = sorted(
            k
            for k in flat
            if k.startswith(prefix) and k[len(prefix) :].split(".")[0] not in names
        )
        if unknown:
            allowed = ", ".join(f"{prefix}{n}" for n in sorted(names))
            raise ConfigError(f"Unknown config key(s) {unknown}; allowed: {allowed}")
    kwargs: dict[str, Any] = {}
    for name in names:
        key = f"{prefix}{name}"
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = build_config(tp, flat, prefix=f"{key}.", strict=strict)
        elif key in flat:
            kwargs[name] = _coerce(key, flat[key], tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err


def _to_flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_to_flat(v, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def field_help(text: str) -> dict[str, str]:
    """Field metadata carrying the help text of a config key (CLI help, docs)."""
    return {"help": text}


def check_choice(key: str, value: str, allowed: typing.Iterable[str]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed`` (all listed)."""
    options = sorted(allowed)
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {options}")


def check_range(
    key: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ConfigError unless ``low (<|<=) value (<|<=) high``."""
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ConfigError(f"{key}={value!r} is out of range; allowed: {lo}{key}{hi}")
