"""The config loader: YAML (or a nested dict) mapped onto a schema of frozen dataclasses.

A schema is a frozen dataclass of sections, each a frozen dataclass of typed fields; a
section may declare its fields' allowed values (`CHOICES`, a class variable mapping a
field to its allowed values) and check its values in `__post_init__` (raising
`ConfigError`), so that a section that exists is valid. A section typed by a base class
with a `KINDS` registry (`ModelConfig`) is a tagged union: its `kind` key picks the
class, and the other keys are those of that class.

Every key is checked before anything runs: an unknown key, a missing required key or a
value of the wrong type is a `ConfigError` naming the file and the dotted key.
Command-line overrides are `key.sub=value` (the value parsed as YAML).
"""

import dataclasses
import math
import pathlib
import re
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid config: the message names the file and the key."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, except that `1e-3` is a float (as in YAML 1.2), not a
    string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_mapping(loader, node, deep=False):
    """A mapping whose keys are unique: a key given twice is an error naming it and both
    lines (YAML itself lets the last one win silently)."""
    loader.flatten_mapping(node)
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (lines {seen[key]} and {line}); "
                              "each key may appear once in a section.")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _check_value(value, tp, where: str, ctx: dict, choices=None):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], where, ctx, choices)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, ctx)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    source = ctx["source"]
    if not ok:
        raise ConfigError(
            f"{source}: key '{where}' must be {tp.__name__}, got "
            f"{type(value).__name__} {value!r}."
        )
    value = float(value) if tp is float else value
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{source}: key '{where}' must be a finite number, got {value!r}.")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{source}: key '{where}' must be one of {tuple(choices)}{ctx['note']}, got "
            f"{value!r}."
        )
    return value


def _build(cls, raw, prefix: str, ctx: dict):
    source = ctx["source"]
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: key '{prefix or '<top level>'}' must be a mapping, got "
            f"{type(raw).__name__} {raw!r}."
        )
    kinds = cls.__dict__.get("KINDS")
    if kinds is not None:  # a tagged union (the base that declares `KINDS`): `kind` picks
        where = f"{prefix}.kind"
        if "kind" not in raw:
            raise ConfigError(f"{source}: missing required key '{where}' (one of "
                              f"{tuple(kinds)}).")
        # the class
        kind = _check_value(raw["kind"], str, where, ctx, tuple(kinds))
        raw = {k: v for k, v in raw.items() if k != "kind"}
        return _build(kinds[kind], raw, prefix, {**ctx, "note": f" for kind {kind!r}"})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    choices = getattr(cls, "CHOICES", {})  # a section's fields with fixed allowed values
    for key in raw:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            if where in ctx["renamed"]:
                raise ConfigError(f"{source}: key '{where}' was renamed to "
                                  f"'{ctx['renamed'][where]}'.")
            raise ConfigError(
                f"{source}: unknown key '{where}'{ctx['note']}; expected one of "
                f"{sorted(fields)}."
            )
    kwargs = {}
    for name, f in fields.items():
        where = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{where}'.")
            continue
        kwargs[name] = _check_value(raw[name], hints[name], where, ctx, choices.get(name))
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section's own checks (`__post_init__`)
        raise ConfigError(f"{source}: {e}") from None


def _set(raw: dict, dotted: str, value, source: str) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override '{dotted}': '{k}' is not a section.")
    node[keys[-1]] = value


def parse_overrides(overrides) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must be 'key.sub=value' (e.g. train.epochs=3)."
            )
        key, text = item.split("=", 1)
        out.append((key.strip(), _yaml(text) if text.strip() else None))
    return out


def read_dict(raw: dict, overrides, source: str, schema):
    """Validate a nested dict (as read from YAML), after applying `overrides`
    (`["train.epochs=3", ...]`), into `schema` (a frozen dataclass of sections). A
    schema's `RENAMED` class variable maps renamed dotted keys to their new names (a
    config using the old name is an error naming the new one)."""
    raw = _yaml(yaml.safe_dump(raw)) if raw is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections (name, model, "
                          f"train, ...), got {type(raw).__name__}.")
    for key, value in parse_overrides(overrides):
        _set(raw, key, value, f"{source} (command line)")
    ctx = {"source": source, "note": "", "renamed": getattr(schema, "RENAMED", {})}
    return _build(schema, raw, "", ctx)


def read_file(path, overrides, schema):
    """Read a YAML file and validate it into `schema` (see `read_dict`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    try:
        raw = _yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return read_dict(raw, overrides, str(path), schema)
