"""The configuration reference (docs/configuration.md), generated from the typed schema.

Every field of every section: its dotted key, type, default, allowed range and docstring, in
schema order. `dist-train config-reference --output docs/configuration.md` rewrites the page, and
a unit test fails when the checked-in page differs from what this renders.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, get_args, get_origin

from dist_train.config.loader import dataclass_in
from dist_train.config.schema import REQUIRED, RunConfig

HEADER = """# Configuration reference

Generated from `dist_train/config/schema.py` by `dist-train config-reference --output docs/configuration.md`;
a test fails when this page is stale. A run is one YAML file plus `a.b.c=value` overrides on the command
line. Unknown keys are errors that name the closest valid key; types and ranges are checked before Ray
starts. `dist-train print-config CONFIG` shows a config with every default filled in.
"""


def type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is tuple:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map {type_name(args[0])} → {type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return {str: "string", int: "int", float: "float", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def field_default(f: dataclasses.Field, section: Any) -> Any:
    """The default a field has in this place of the tree: a section's own factory may set other
    defaults than its class does (finetune.train turns on gradient checkpointing)."""
    if section is not None:
        return getattr(section, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def default_text(value: Any) -> str:
    if value is REQUIRED:
        return "**required**"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def range_text(f: dataclasses.Field) -> str:
    bounds = (("ge", "≥"), ("gt", ">"), ("le", "≤"))
    return ", ".join(f"{sign} {f.metadata[key]:g}" for key, sign in bounds if f.metadata.get(key) is not None)


def sections(cls: type, prefix: str = "", section: Any = None) -> list[tuple[str, type, Any]]:
    """(dotted path, dataclass, its default instance or None) of cls and every section under it,
    depth first in schema order."""
    out = [(prefix, cls, section)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = dataclass_in(hints[f.name])
        if sub is not None:
            list_of = get_origin(hints[f.name]) is tuple or any(get_origin(a) is tuple for a in get_args(hints[f.name]))
            value = field_default(f, section)
            out += sections(sub, f"{prefix}{f.name}{'[]' if list_of else ''}.",
                            value if dataclasses.is_dataclass(value) else None)
    return out


def reference() -> str:
    parts = [HEADER]
    for prefix, cls, section in sections(RunConfig):
        hints = typing.get_type_hints(cls)
        parts.append(f"## `{prefix.rstrip('.')}`\n" if prefix else "## Top level\n")
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            parts.append(" ".join(cls.__doc__.split()) + "\n")
        rows = ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            doc = " ".join(f.metadata.get("doc", "").split()).replace("|", "\\|")
            if dataclass_in(hints[f.name]) is not None:
                doc += f" See [`{prefix}{f.name}`](#{anchor(prefix + f.name)})."
            rows.append(f"| `{prefix}{f.name}` | {type_name(hints[f.name])} | "
                        f"{default_text(field_default(f, section))} | {range_text(f)} | {doc} |")
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def anchor(key: str) -> str:
    """GitHub's heading anchor for a section heading `key` (brackets and dots dropped)."""
    return "".join(c for c in key.lower() if c.isalnum() or c in "-_")
