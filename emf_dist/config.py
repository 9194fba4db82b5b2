"""Typed configs: YAML files + dotted CLI overrides -> validated dataclasses.

Every component owns a small ``@dataclass`` config; job configs nest them.
This module is generic (it knows no concrete config class) and depends only
on the standard library and PyYAML, so it can run first, before torch/Ray
start, and reject a bad config in milliseconds instead of minutes into a job.

Typical use::

    cfg = parse_cli(TrainConfig, sys.argv[1:])  # job.yaml model.depth=12 ...

All user mistakes raise one ``ConfigError`` listing every problem found, each
prefixed by its dotted path, so a user can fix everything in one go.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "from_dict", "to_dict", "apply_overrides",
           "load_config", "save_config", "parse_cli", "validate_config"]

T = TypeVar("T")
_INVALID = object()  # sentinel: conversion failed, the problem is recorded


class ConfigError(ValueError):
    """A user mistake in a config; ``problems`` holds one line per problem."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``); plain
    ``lr: 1e-4`` would silently become a string and then fail type checking.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _problem(path: str, msg: str) -> str:
    return f"{path or '<root>'}: {msg}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    # Annotations are strings (``from __future__ import annotations``).
    return typing.get_type_hints(cls)


# --------------------------------------------------------------------------- #
# dict -> dataclass
# --------------------------------------------------------------------------- #

def from_dict(cls: type[T], data: Mapping, *, path: str = "",
              validate: bool = False) -> T:
    """Build ``cls`` from nested plain data, checking types against annotations.

    With ``validate=True`` each built dataclass's ``validate()`` also runs.
    Raises one ConfigError with every problem found.
    """
    errors: list[str] = []
    result = _convert(cls, data, path, errors, validate)
    if errors:
        raise ConfigError(errors)
    return result


def _convert(tp: Any, value: Any, path: str, errors: list[str], validate: bool) -> Any:
    """Check/convert ``value`` to type ``tp``; on failure record and return _INVALID."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail() -> object:
        errors.append(_problem(path, f"expected {_type_name(tp)}, got {_show(value)}"))
        return _INVALID

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build_dataclass(tp, value, path, errors, validate)
    if origin is Union or origin is types.UnionType:
        return _convert_union(tp, args, value, path, errors, validate)
    if origin is Literal:
        # Compare types too: True == 1, but True is not a valid Literal[1].
        if any(value == a and type(value) is type(a) for a in args):
            return value
        choices = ", ".join(repr(a) for a in args)
        errors.append(_problem(path, f"expected one of {choices}, got {_show(value)}"))
        return _INVALID
    if tp in (int, float) and isinstance(value, bool):
        return fail()  # bool subclasses int, but True is no valid depth or lr
    if tp is float:  # an int is a fine float (``lr: 1``)
        return float(value) if isinstance(value, (int, float)) else fail()
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return fail()
        return _convert_sequence(tp, origin or tp, args, value, path, errors, validate)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            return fail()
        key_tp, val_tp = args or (Any, Any)
        out = {_convert(key_tp, k, _join(path, k), errors, validate):
               _convert(val_tp, v, _join(path, k), errors, validate) for k, v in value.items()}
        return out if _INVALID not in out and _INVALID not in out.values() else _INVALID
    if isinstance(tp, type):  # str, bool, or any other plain class
        return value if isinstance(value, tp) else fail()
    return value  # a typing construct we do not check (e.g. Callable)


def _convert_union(tp, args, value, path, errors, validate):
    if value is None:
        if type(None) in args:
            return None
        errors.append(_problem(path, f"expected {_type_name(tp)}, got None"))
        return _INVALID
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own error message is the clearest
        return _convert(options[0], value, path, errors, validate)
    for option in options:  # first alternative that accepts the value wins
        trial: list[str] = []
        result = _convert(option, value, path, trial, validate)
        if not trial:
            return result
    errors.append(_problem(path, f"expected {_type_name(tp)}, got {_show(value)}"))
    return _INVALID


def _convert_sequence(tp, container, args, value, path, errors, validate):
    if container is tuple and args and args[-1] is not Ellipsis:  # fixed tuple
        if len(value) != len(args):
            errors.append(_problem(path, f"expected {len(args)} items, got {len(value)}"))
            return _INVALID
        item_types = args
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [_convert(t, v, f"{path}[{i}]", errors, validate)
             for i, (t, v) in enumerate(zip(item_types, value))]
    return _INVALID if _INVALID in items else container(items)


def _build_dataclass(cls, value, path, errors, validate):
    if isinstance(value, cls):
        value = to_dict(value)
    if not isinstance(value, Mapping):
        errors.append(_problem(path, f"expected a mapping for {cls.__name__}, got {_show(value)}"))
        return _INVALID
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    start = len(errors)
    for key in value:
        if key not in fields:
            errors.append(_problem(_join(path, key), _unknown_key_msg(str(key), fields)))
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            given = value[name]
            if isinstance(given, Mapping) and field.default_factory is not dataclasses.MISSING:
                # A partial mapping overrides the field's own default instance, not the
                # nested class's defaults: `model.depth=3` keeps the job's other model values.
                default = field.default_factory()
                if dataclasses.is_dataclass(default) and _extends(default, given, _hints(cls)[name]):
                    given = {**to_dict(default), **given}
            kwargs[name] = _convert(_hints(cls)[name], given, _join(path, name), errors, validate)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            errors.append(_problem(_join(path, name), "missing required value"))
    if len(errors) > start:
        return _INVALID  # a broken subtree is neither built nor validated
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # e.g. a __post_init__ check
        errors.append(_problem(path, str(exc)))
        return _INVALID
    if validate and hasattr(obj, "validate"):
        errors.extend(_problem(path, str(p)) for p in (obj.validate() or ()))
    return obj


def _extends(default: Any, given: Mapping, hint: Any) -> bool:
    """Whether ``given`` overrides fields of ``default``. For a union of dataclasses, a mapping with
    keys the default's class lacks describes another alternative and is taken as it is."""
    if typing.get_origin(hint) not in (Union, types.UnionType):
        return True
    return set(given) <= {f.name for f in dataclasses.fields(default)}


def _unknown_key_msg(key: str, fields: Iterable[str]) -> str:
    valid = list(fields)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (valid: {', '.join(valid) or 'none'})"


# --------------------------------------------------------------------------- #
# dataclass -> dict, overrides, files
# --------------------------------------------------------------------------- #

def to_dict(cfg: Any) -> Any:
    """Plain nested data (dicts, lists, scalars) that round-trips via from_dict."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name))
                for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def non_defaults(cfg: Any) -> Any:
    """``to_dict`` without the fields left at their defaults, recursively: a config's identity
    that stays the same when a later version adds a field (pipelines fingerprint steps by it,
    so an upgrade does not rerun every finished step)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return to_dict(cfg)
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = to_dict(getattr(cfg, f.name))
        if f.default is not dataclasses.MISSING and value == to_dict(f.default):
            continue
        if f.default_factory is not dataclasses.MISSING and value == to_dict(f.default_factory()):
            continue
        out[f.name] = non_defaults(getattr(cfg, f.name))
    return out


def validate_config(cfg: Any) -> None:
    """Re-check types and run every ``validate()`` on an already built config."""
    from_dict(type(cfg), to_dict(cfg), validate=True)


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """Return a copy of ``data`` with ``dotted.key=value`` overrides applied.

    Values are YAML flow values: ``12``, ``-0.4``, ``true``, ``[a, b]``, ``null``.
    """
    out = copy.deepcopy(dict(data))
    errors: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            errors.append(f"{item!r}: malformed override, expected dotted.key=value")
            continue
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as exc:
            errors.append(f"{key}: cannot parse override value {raw!r}: {exc}")
            continue
        node = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                errors.append(f"{key}: cannot set, {'.'.join(parts[:i + 1])} is not a mapping")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
    if errors:
        raise ConfigError(errors)
    return out


def _read_yaml(path: str | os.PathLike) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return dict(data)


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """YAML file (optional) + overrides -> validated ``cls`` instance."""
    data = _read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides), validate=True)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (field order kept) so a run can be reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def add_config_argument(parser, where: str, example: str) -> None:
    """The positional every config-driven command takes, in the form ``parse_cli`` reads."""
    parser.add_argument("config", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                        help=f"optional YAML config ({where}), then dotted overrides, e.g. {example}")


def parse_cli(cls: type[T], argv: Sequence[str]) -> T:
    """``[config.yaml] [dotted.key=value ...]`` -> validated ``cls`` instance."""
    argv = list(argv)
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    return load_config(cls, path, argv)
