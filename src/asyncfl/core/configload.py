"""Turn plain data (parsed YAML) into frozen config dataclasses, reporting every problem.

Written by hand because the field needs are small and specific: one pass that collects
*all* problems (path, bad value, what is allowed) instead of stopping at the first, tagged
unions of dataclasses selected by their ``name`` field, and each dataclass's own
``validate()`` for range checks. Libraries that do this (pydantic) would add a large
dependency whose errors do not follow our one-error-type contract.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from asyncfl.errors import ConfigError, ConfigProblem

__all__ = ["apply_overrides", "build_config", "to_plain"]

T = TypeVar("T")
_MISSING = object()


def build_config(cls: type[T], data: object) -> T:
    """Build ``cls`` from ``data``; raise :class:`ConfigError` listing every problem."""
    problems: list[ConfigProblem] = []
    out = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return typing.cast(T, out)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return f"a mapping ({tp.__name__})"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, str(tp)
    )


def _build(tp: Any, value: object, path: str, problems: list[ConfigProblem]) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build_dataclass(tp, value, path, problems)
    if origin in (Union, types.UnionType):
        return _build_union(tp, value, path, problems)
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        problems.append(ConfigProblem(path, value, _describe(tp)))
        return None
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        if not isinstance(value, Sequence) or isinstance(value, str):
            problems.append(ConfigProblem(path, value, _describe(tp)))
            return None
        return tuple(_build(item, v, f"{path}[{i}]", problems) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    else:  # pragma: no cover - a config class used a type this loader does not know
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    problems.append(ConfigProblem(path, value, _describe(tp)))
    return None


def _build_union(tp: Any, value: object, path: str, problems: list[ConfigProblem]) -> Any:
    options = get_args(tp)
    if value is None and type(None) in options:
        return None
    classes = [o for o in options if dataclasses.is_dataclass(o)]
    if len(classes) == 1:  # an optional section: ``Section | None``
        return _build(classes[0], value, path, problems)
    if classes:
        # A tagged union: pick the dataclass whose ``name`` Literal matches.
        name = value.get("name") if isinstance(value, Mapping) else None
        for c in classes:
            tag = get_type_hints(c)["name"]
            if name in get_args(tag):
                return _build(c, value, path, problems)
        allowed = [get_args(get_type_hints(c)["name"])[0] for c in classes]
        problems.append(ConfigProblem(_join(path, "name"), name, f"one of {allowed}"))
        return None
    non_null = [o for o in options if o is not type(None)]
    for option in non_null:
        trial: list[ConfigProblem] = []
        out = _build(option, value, path, trial)
        if not trial:
            return out
    problems.append(ConfigProblem(path, value, _describe(tp)))
    return None


def _build_dataclass(
    cls: type[Any], value: object, path: str, problems: list[ConfigProblem]
) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        problems.append(ConfigProblem(path or "<root>", value, _describe(cls)))
        return None
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    for key in unknown:
        problems.append(
            ConfigProblem(
                _join(path, str(key)), value[key], f"no such field; known: {sorted(fields)}"
            )
        )
    kwargs: dict[str, Any] = {}
    broken = False
    for name in fields:
        if name in value:
            kwargs[name] = _build(hints[name], value[name], _join(path, name), problems)
            broken = broken or (kwargs[name] is None and value[name] is not None)
    if broken or unknown:
        return None
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(ConfigProblem(path or "<root>", dict(value), str(exc)))
        return None
    # Range problems do not stop the parent from being built and checked too, so one pass
    # reports every bad field.
    validate = getattr(obj, "validate", None)
    if callable(validate):
        for p in validate():
            problems.append(ConfigProblem(_join(path, p.path), p.value, p.expected))
    return obj


def to_plain(obj: object) -> Any:
    """A config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    return obj


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a copy of ``data``."""
    import yaml

    out: dict[str, Any] = _deep_copy(data)
    problems: list[ConfigProblem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(ConfigProblem("--set", item, "key.path=value"))
            continue
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problems.append(ConfigProblem(key, raw, f"a YAML value ({exc})"))
            continue
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(ConfigProblem(key, item, f"{part} is not a mapping"))
                break
            node = child
        else:
            node[parts[-1]] = parsed
    if problems:
        raise ConfigError(problems)
    return out


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
