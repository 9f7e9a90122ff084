"""Fill the typed config tree from YAML files, dicts and dotted ``key=value`` overrides.

Every value is checked against the dataclass field's type here, at load time, so a typo or a wrong
type fails before any Ray actor or GPU is reserved. Range checks live in each dataclass's
``__post_init__`` (see ``schema.py``) and run as the tree is built; the root's resolves the whole tree
(``resolve.py``), which checks the sections against each other.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from rlhf_ray.config.errors import ConfigError

RESOLVED_KEY = "resolved"
"""Top-level section of a run's ``config.yaml`` holding what the run derived (``Resolved.to_dict``): an output,
so loading that file skips it and derives it again."""


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(options))}."


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {value!r}")
        return build(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}'.{_closest(str(name), list(fields))}")
        kwargs[name] = _coerce(value, hints[name], key)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"missing required config key '{where}{missing[0]}'")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(f"{prefix}.{exc}") from None
        raise


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a","b","c"], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def merge_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating sections as needed."""
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{'.'.join(path[: i + 1])}' is a value, not a section")
        node = child
    node[path[-1]] = value


def to_dict(cfg: Any) -> Any:
    """The resolved config as plain dicts/lists (for YAML dumps and loggers)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def read_yaml_mapping(path: Path, error: type[Exception], not_found: str, shape: str, prefix: str = "") -> dict:
    """The YAML mapping in ``path``; ``error(not_found)`` when the file is missing, ``error(f"{prefix}{path}: ...")``
    when it is not YAML or its top level is not a mapping (``shape`` says what it should be)."""
    if not path.is_file():
        raise error(not_found)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{prefix}{path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise error(f"{prefix}{path}: top level must be {shape}")
    return loaded


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Any:
    """Load ``path`` (YAML) and/or ``values``, apply dotted overrides, return a validated ``Config``.

    Relative paths inside the file are kept as written (resolved against the working directory),
    which is what ``ray job submit --working-dir`` expects.
    """
    from rlhf_ray.config.schema import Config

    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        tree = read_yaml_mapping(p, ConfigError, f"config file not found: {p}", "a mapping of sections")
        tree.pop(RESOLVED_KEY, None)  # a run's config.yaml: what it derived, derived again from the rest
    if values:
        for key, value in values.items():
            merge_override(tree, key.split("."), value)
    for text in overrides or []:
        merge_override(tree, *parse_override(text))
    return build(Config, tree)


def save_config(cfg: Any, path: str | os.PathLike, resolved: Any = None) -> None:
    """Write the config as the user gave it, and under ``resolved`` what the run derived from it (atomically).

    The file loads again with ``load_config`` (the ``resolved`` section is skipped and re-derived).
    """
    data = to_dict(cfg)
    if resolved is not None:
        data[RESOLVED_KEY] = resolved.to_dict()
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, p)
