"""Render the config reference (docs/config.md) from the config dataclasses themselves.

Field docs are the string literals written right after each field (read with ``ast``), so
the reference cannot drift from the code; a test checks docs/config.md is current.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

__all__ = ["render_config_reference"]


def _field_docs(cls: type[Any]) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
        if dataclasses.is_dataclass(v):
            return "(section)"
    else:
        return "required"
    if isinstance(v, tuple):
        v = list(v)
    return "`null`" if v is None else f"`{v}`"


def render_config_reference(root: type[Any]) -> str:
    seen: list[type[Any]] = []

    def visit(cls: type[Any]) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for tp in get_type_hints(cls).values():
            for inner in (tp, *get_args(tp)):
                if dataclasses.is_dataclass(inner) and isinstance(inner, type):
                    visit(inner)

    visit(root)
    out = [
        "# Config reference",
        "",
        "Generated from the config dataclasses by `asyncfl config-doc`; do not edit by hand.",
        "Every config is YAML; unknown keys are errors, and a bad config reports every bad",
        "field (path, value, what is allowed) before anything runs. Override any field on the",
        "command line with `--set path.to.field=value` (the value is parsed as YAML).",
        "",
        "`algorithm` is one of FedBuffConfig, FedAvgConfig, FedAsyncConfig, chosen by its `name`.",
        "",
    ]
    for cls in seen:
        hints = get_type_hints(cls)
        docs = _field_docs(cls)
        out += [f"## {cls.__name__}", ""]
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(cls.__name__ + "("):
            out += [doc.split("\n\n")[0].replace("\n", " "), ""]
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            meaning = docs.get(f.name, "").replace("|", "\\|")
            out.append(f"| `{f.name}` | {_type_name(hints[f.name])} | {_default(f)} | {meaning} |")
        out.append("")
    return "\n".join(out)
