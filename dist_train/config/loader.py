"""YAML + `a.b.c=value` overrides -> a strictly checked `RunConfig`.

Guarantees: an unknown key is an error naming the closest valid key; every value has its
declared type (ints stay ints, `3e-4` is accepted as a float) and range; errors are one line
and name the fix. Nothing here touches the filesystem beyond reading the YAML file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_train.config.schema import REQUIRED, RunConfig


class ConfigError(ValueError):
    """A mistake in a config, named with the offending key and value and how to fix it."""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults when path is None) and apply overrides."""
    raw = read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(raw, item)
    return from_dict(interpolate(raw))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML config file, with one-line errors for a missing file or bad YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found: pass the path of a YAML file "
                          "(e.g. configs/quickstart.yaml)")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size:,} bytes is not a config (at most {MAX_YAML_BYTES:,}): "
                          "pass the YAML config file")
    try:
        loaded = bounded_yaml(p.read_text(errors="replace"), str(p))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: fix the syntax") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, not {type(loaded).__name__}")
    return loaded or {}


MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # values after aliases are expanded: a config has hundreds
MAX_YAML_DEPTH = 32  # nesting levels: a config has four or five


def bounded_yaml(text: str, name: str) -> Any:
    """yaml.safe_load, refusing (ConfigError) a document whose aliases would expand beyond MAX_YAML_NODES
    values or that nests deeper than MAX_YAML_DEPTH, before anything is built from it ("billion laughs")."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            size, depth = _measure(node, {})
        except RecursionError:
            size, depth = 0, MAX_YAML_DEPTH + 1
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{name}: nests deeper than {MAX_YAML_DEPTH} levels: a config is a few levels deep")
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{name}: expands to more than {MAX_YAML_NODES:,} values (through YAML aliases?): "
                              "write the config out plainly")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _measure(node: yaml.Node, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(values, depth) of a composed YAML node once its aliases are expanded, without expanding them:
    an alias is the same node object, measured once."""
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    size, depth = 1, 1
    for child in children:
        s, d = _measure(child, memo)
        size, depth = size + s, max(depth, d + 1)
        if size > MAX_YAML_NODES or depth > MAX_YAML_DEPTH:
            break  # enough to refuse
    memo[id(node)] = (size, depth)
    return size, depth


_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def interpolate(raw: dict[str, Any]) -> dict[str, Any]:
    """Replace `${a.b}` inside string values with the value of key a.b of the same config.

    References are resolved after the overrides, so `prepare.dir=/shared/qs` moves every path
    written as `${prepare.dir}/...` with it. A reference to a key that is not set, or a cycle,
    is a ConfigError naming both keys.
    """

    def lookup(key: str, where: str, seen: tuple[str, ...]) -> Any:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{where}: ${{{key}}} refers to a key this config does not set: set {key} "
                                  "or write the value itself")
            node = node[part]
        if key in seen:
            raise ConfigError(f"{where}: ${{{key}}} forms a cycle ({' -> '.join((*seen, key))})")
        return resolve(node, key, (*seen, key))

    def resolve(value: Any, where: str, seen: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, f"{where}.{k}" if where else k, seen) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, where, seen) for v in value]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _REF.fullmatch(value)
        if whole:  # a bare reference keeps the referenced value's type
            return lookup(whole.group(1), where, seen)
        return _REF.sub(lambda m: str(lookup(m.group(1), where, seen)), value)

    return resolve(raw, "", ())


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a raw nested dict; the value is parsed as YAML (`10`, `true`, `null`)."""
    key, sep, text = item.partition("=")
    if not sep or not _valid_key(key):
        raise ConfigError(f"override {item!r} is not of the form a.b.c=value "
                          "(e.g. pretrain.train.max_steps=10)")
    try:
        value = bounded_yaml(text, f"override {key}") if text else ""
    except yaml.YAMLError:
        value = text
    set_key(raw, key, value)


def _valid_key(key: str) -> bool:
    return bool(key) and all(key.split("."))


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` to `value` in a raw nested dict, creating the sections on the way."""
    if not _valid_key(key):
        raise ConfigError(f"override key {key!r} is not of the form a.b.c (e.g. pretrain.train.max_steps)")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build the typed tree from a plain nested dict (as written by `to_dict`)."""
    return _build(RunConfig, raw, "")


def to_dict(cfg: Any) -> Any:
    """The resolved config as plain data (JSON/YAML-safe), the inverse of `from_dict`."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(item) for item in cfg]
    return cfg


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key path of the schema, for suggestions and the reference docs."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        keys.append(path)
        sub = dataclass_in(hints[f.name])
        if sub is not None:
            keys.extend(all_keys(sub, path + "."))
    return keys


def dataclass_in(tp: Any) -> type | None:
    for arg in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


MOVED = {  # keys of earlier versions: where their meaning lives now
    "pretrain.train.eval_batches": "it became pretrain.eval.samples (held-out samples per evaluation set, the same "
                                   "on any worker count)",
    "finetune.train.eval_batches": "fine-tuning evaluates its whole validation set",
}


def nearest_choice(value: str, choices: list[str]) -> str | None:
    """The choice a mistyped `value` most likely meant: spelling first, but a value that is a whole
    word of exactly one choice means that one ("classification" is sequence_classification, not the
    better-spelled token_classification)."""
    words = value.lower().replace("-", "_")
    whole = [c for c in choices if words in c.lower().split("_") or c.lower().endswith("_" + words)]
    if len(whole) > 1:  # ambiguous as a word: the plain sequence one is the common meaning
        whole = [c for c in whole if c.lower().startswith("sequence_")] or whole
    if len(whole) == 1:
        return whole[0]
    near = difflib.get_close_matches(value, choices, n=1)
    return near[0] if near else None


def _suggest(path: str) -> str:
    if path in MOVED:
        return f": {MOVED[path]}"
    candidates = all_keys()
    match = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not match:  # the right (or a near) leaf under another section, e.g. train.max_steps
        leaf = path.rsplit(".", 1)[-1]
        leaves = sorted({k.rsplit(".", 1)[-1] for k in candidates})
        near = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.7)
        match = [k for k in candidates if near and k.rsplit(".", 1)[-1] == near[0]][:1]
    return f"; did you mean {match[0]!r}?" if match else ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{_suggest(prefix + str(key))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if f.name in raw:
            given = raw[f.name]
            if isinstance(given, dict) and f.default_factory is not dataclasses.MISSING:
                # a section whose default differs by place (finetune.train vs pretrain.train): the
                # keys given override that default, not the bare class defaults
                base = to_dict(f.default_factory())
                if isinstance(base, dict):
                    given = _merged(base, given)
            value = _coerce(hints[f.name], given, path)
            _check_range(f, value, path)
            kwargs[f.name] = value
        elif f.default is REQUIRED:
            raise ConfigError(f"missing required config key {path!r}: set it in the YAML or as "
                              f"{path}=VALUE")
    return cls(**kwargs)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if origin is tuple:  # tuple[X, ...]: a YAML list of X
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} = {_show(value)} must be a list")
        return tuple(_coerce(inner, item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is dict:  # free-form JSON-like mapping (e.g. DeepSpeed keys we do not type)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path} = {_show(value)} must be a mapping of keys")
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):  # 1 is not True here
            near = nearest_choice(str(value), [str(c) for c in choices])
            hint = f"; did you mean {near!r}?" if near else ""
            raise ConfigError(f"{path} = {_show(value)} is not one of {list(choices)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            raise ConfigError(f"{path} must be a mapping, got null")
        return _build(tp, value, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} = {_show(value)} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {_show(value)} must be an integer")
        return value
    if tp is float:
        # YAML 1.1 reads 3e-4 (no dot) as a string: accept it, as promised in DESIGN.md.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} = {_show(value)} must be a number")
        if not math.isfinite(value):  # NaN slips through every range check; inf is no setting either
            raise ConfigError(f"{path} = {value} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path} = {_show(value)} must be a non-empty string")
        return value
    raise TypeError(f"schema type {tp!r} at {path} is not supported by the loader")


def _check_range(f: dataclasses.Field, value: Any, path: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    meta = f.metadata
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(f"{path} = {value} is out of range: it must be >= {meta['ge']}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"{path} = {value} is out of range: it must be > {meta['gt']}")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(f"{path} = {value} is out of range: it must be <= {meta['le']}")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if value is not None else "null"
