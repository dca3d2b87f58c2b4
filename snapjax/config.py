"""Experiment configs: ml_collections ``.py`` files in, frozen dataclasses out.

A config file defines ``get_config(arg)`` returning a ``ConfigDict``; ``arg`` picks a variant
(``configs/world_teacher.py:cpu``). :func:`load_config` imports it, locks it and applies
command-line overrides (``--config.opt.lr=1e-4``), parsing each value with the type of the field
it replaces, so a typo'd key or a wrongly typed value fails before anything is built.

Defaults live in one place, the library's dataclasses: a config section starts as
``as_config(OptimConfig)`` (every field with its default, overridable) and the file sets only
what differs; at the library boundary :func:`from_config` turns the section back into the
frozen dataclass, whose ``__post_init__`` validates it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import ml_collections
from ml_collections import config_dict

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


# ------------------------------------------------------------------ dataclass <-> ConfigDict

def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _runtime_type(tp) -> type:
    origin = typing.get_origin(tp)
    if origin is not None:
        return origin if isinstance(origin, type) else object
    return tp if isinstance(tp, type) else object


def as_config(obj_or_cls: Any) -> ml_collections.ConfigDict:
    """A dataclass (class: its defaults; instance: its values) as a ConfigDict section.

    ``None`` values become typed placeholders so that ``--config.x=0.5`` still type-checks.
    """
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"as_config expects a dataclass, got {cls!r}")
    hints = _field_types(cls)
    section = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        if obj_or_cls is cls:
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise TypeError(f"{cls.__name__}.{f.name} has no default; build the section "
                                f"from an instance: as_config({cls.__name__}(...))")
        else:
            value = getattr(obj_or_cls, f.name)
        inner, _ = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(value):
            section[f.name] = as_config(value)
        elif value is None:
            section[f.name] = config_dict.placeholder(_runtime_type(inner))
        else:
            section[f.name] = value
    return section


def _to_python(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_to_python(v) for v in value)
    return value


def from_config(cls: type[T], section: Any, name: str) -> T:
    """The frozen dataclass ``cls`` from config section ``name`` (a ConfigDict or a dict).

    Unknown or missing keys are errors naming the section; the dataclass validates the values.
    """
    if isinstance(section, cls):
        return section
    if not isinstance(section, (ml_collections.ConfigDict, dict)):
        raise ConfigError(f"config.{name} must be a section for {cls.__name__}, "
                          f"got {type(section).__name__}")
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    keys = set(section.keys())
    unknown = sorted(keys - set(fields))
    if unknown:
        raise ConfigError(f"config.{name}: unknown key(s) {unknown} for {cls.__name__}; "
                          f"known: {sorted(fields)}")
    missing = sorted(k for k, f in fields.items() if k not in keys
                     and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"config.{name}: missing key(s) {missing} for {cls.__name__}")
    kwargs = {}
    for key in keys:
        inner, _ = _strip_optional(hints[key])
        value = section[key]
        if dataclasses.is_dataclass(inner) and value is not None:
            kwargs[key] = from_config(inner, value, f"{name}.{key}")
        else:
            kwargs[key] = _to_python(value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{name}: {e}") from None


# ----------------------------------------------------------------------------- loading + overrides

def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` -> the locked ConfigDict, with ``overrides`` applied.

    ``overrides`` are command-line strings: ``--config.a.b=value``, ``config.a.b=value`` or
    ``--config.a.b value`` (two items).
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(
        f"snapjax_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"config file {path!r} failed to import: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, "
                          f"got {type(config).__name__}")
    config.lock()
    for key, raw in _split_overrides(overrides):
        set_override(config, key, raw)
    return config


def base_config(config_file: str, name: str, arg: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file ``name`` beside ``config_file`` (a config that
    extends another: ``base_config(__file__, "world_robust.py", arg)``), unlocked."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    module_spec = importlib.util.spec_from_file_location(
        f"snapjax_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def _split_overrides(items: Sequence[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    items = list(items)
    while i < len(items):
        item = items[i]
        body = item[2:] if item.startswith("--") else item
        if not body.startswith("config."):
            raise ConfigError(f"unexpected argument {item!r}: overrides look like "
                              "--config.section.key=value")
        body = body[len("config."):]
        if "=" in body:
            key, raw = body.split("=", 1)
            i += 1
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, raw = body, items[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {item!r} has no value; write --config.{body}=VALUE")
        pairs.append((key, raw))
    return pairs


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_flat_keys(v, prefix + k + "."))
    return keys


def _unknown_key(config, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _flat_keys(config), n=5, cutoff=0.6)
    # The deepest existing section on the path: its keys are what the user was looking for.
    section, prefix = config, ""
    for part in key.split(".")[:-1]:
        if part in section and isinstance(section[part], ml_collections.ConfigDict):
            section, prefix = section[part], prefix + part + "."
        else:
            break
    leaf = key.split(".")[len(prefix.split(".")) - 1] if prefix else key.split(".")[0]
    siblings = [prefix + k for k in section.keys()]
    close += [prefix + c for c in difflib.get_close_matches(leaf, list(section.keys()), n=3,
                                                            cutoff=0.3)
              if prefix + c not in close]
    hint = f"; did you mean {', '.join('config.' + c for c in close)}?" if close else ""
    where = f"config.{prefix[:-1]}" if prefix else "config"
    return ConfigError(f"config.{key} does not exist{hint} (keys in {where}: "
                       f"{', '.join(sorted(siblings))})")


def set_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets dotted ``key`` from the string ``raw``, parsed as the field's current type."""
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise _unknown_key(config, key)
        node = node[part]
    if leaf not in node:
        raise _unknown_key(config, key)
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a section; set one of its keys "
                          f"({', '.join(sorted(node[leaf].keys()))})")
    field_type = node.get_type(leaf)
    value = _parse(raw, field_type, key)
    with node.ignore_type():
        node[leaf] = value


def _parse(raw: str, field_type: type, key: str) -> Any:
    if raw in ("None", "none", "null"):
        return None
    try:
        if field_type is bool:
            lowered = raw.lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(raw)
        if field_type is int:
            return int(raw)
        if field_type is float:
            return float(raw)
        if field_type is str:
            return raw
        if field_type in (tuple, list):
            value = ast.literal_eval(raw)
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return _to_python(value)
        # An unset field of unknown type (placeholder(object)): take a Python literal if it is one.
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    except (ValueError, SyntaxError):
        raise ConfigError(f"config.{key}={raw!r}: expected a value of type "
                          f"{field_type.__name__}") from None


def to_json(config: ml_collections.ConfigDict) -> dict:
    """A plain JSON-able dict of the config (tuples become lists), for checkpoints and logs."""
    return json.loads(config.to_json_best_effort())
