"""YAML configs, translated once at the edge into plain dicts.

- `_BASE_: other.yaml` (path relative to the file that names it; a list is allowed) is loaded first
  and deep-merged under the file.
- `KEY=VALUE` overrides use dotted keys (`optim.lr=0.05`); values are parsed as YAML (`true`, `[1,
  2]`).
- With `defaults` (a nested dict declaring every valid key), unknown keys are an error that lists
  the valid ones, keys the file leaves out take their defaults, and a value whose type differs from
  a declared scalar default's (a string for a number, a number for a flag) is an error naming the
  key and both types; so are the items of a list whose default items share one type, and, with
  `types` (each stage's `TYPES`), the values of keys whose default is null (`data.max_train:
  "50"`).
- Another spelling of a shared key (`solver.lr`, `data.workers`, ...:
  `mixup_transfer.core.vocabulary.RENAMED`) is refused with the key to use.
- Numbers are read as YAML 1.2 reads them: `1e-3` is a float (PyYAML's YAML 1.1 would make it a
  string).
"""

from __future__ import annotations

import copy
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


_NONE = object()


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats: 1e-3, 1E5 and .5 are numbers, not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """A new dict: `override` merged into `base`, recursing into nested mappings."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_with_bases(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"_BASE_ cycle: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    bases = data.pop("_BASE_", None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        merged = deep_merge(merged, _load_with_bases(path.parent / base, seen + (path,)))
    return deep_merge(merged, data)


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return cfg


def validate(cfg: Mapping, defaults: Mapping, where: str = "",
             types: Mapping | None = None) -> dict:
    """Fill missing keys from `defaults`; reject keys `defaults` does not declare.

    A value must have its default's type (`_check_type`; the items of a list too); a dict default
    is checked recursively unless it is empty (a free-form mapping). A key whose default is `None`
    accepts any value unless `types` (dotted key -> `int`, `float` (any number), `str`, `bool`,
    `list`, `dict`, `list[int]`, a tuple of those, ...) declares its type: then it must be None or
    of that type (`check_types`).
    """
    if not where:
        # never from a recipe or an override
        if "allow_pickle" in cfg and "allow_pickle" not in defaults:
            raise ConfigError("config key allow_pickle: unpickling cannot be turned on from a "
                              "config or an override; pass --allow-pickle to the tool, for a "
                              "checkpoint you trust")
        _refuse_renamed(cfg, defaults)
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys"
            f"{' under ' + where if where else ''}: {sorted(defaults)}")
    out = {}
    for k, default in defaults.items():
        if k not in cfg:
            out[k] = copy.deepcopy(default)
        elif isinstance(default, Mapping) and default and isinstance(cfg[k], Mapping):
            out[k] = validate(cfg[k], default, f"{where}.{k}" if where else k)
        else:
            _check_type(f"{where}.{k}" if where else k, cfg[k], default)
            out[k] = copy.deepcopy(cfg[k])
    if types:
        check_types(out, types)
    return out


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping"}


def _is(value, spec) -> bool:
    """Whether `value` is of `spec` (see `validate`): ints are numbers, bools are neither."""
    if isinstance(spec, tuple):
        return any(_is(value, s) for s in spec)
    origin = typing.get_origin(spec)
    if origin is list:
        (item,) = typing.get_args(spec)
        return isinstance(value, (list, tuple)) and all(_is(v, item) for v in value)
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if spec is list:
        return isinstance(value, (list, tuple))
    if spec is dict:
        return isinstance(value, Mapping)
    return isinstance(value, spec)


def _type_name(spec) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_type_name(s) for s in spec)
    if typing.get_origin(spec) is list:
        return f"a list of {_type_name(typing.get_args(spec)[0]).split(' ', 1)[1]}s"
    return _TYPE_NAMES.get(spec, getattr(spec, "__name__", str(spec)))


def check_types(cfg: Mapping, types: Mapping) -> None:
    """Each dotted key of `types` must be None or of its declared type; ConfigError naming the key
    otherwise."""
    for key, spec in types.items():
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and not _is(node, spec):
            raise ConfigError(f"config key {key}: expected {_type_name(spec)} (or null), got "
                              f"{node!r} ({type(node).__name__})")


def _check_type(key: str, value, default) -> None:
    """The value of a key whose default is a flag, a number, a list or a mapping must be one too
    (None and string defaults accept any value; an integer is a valid float)."""
    if value is None or default is None or isinstance(default, str):
        return
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, (list, tuple)):
        ok, want = isinstance(value, (list, tuple)), "a list"
        kinds = {type(v) for v in default}
        # the items' type too
        if ok and default and len(kinds) == 1 and kinds <= {int, float, str, bool}:
            item = kinds.pop()
            bad = next((v for v in value if not _is(v, item)), _NONE)
            if bad is not _NONE:
                raise ConfigError(f"config key {key}: every item must be {_TYPE_NAMES[item]} "
                                  f"(like the default {default!r}), got {bad!r} "
                                  f"({type(bad).__name__}) in {value!r}")
    elif isinstance(default, Mapping):
        ok, want = isinstance(value, Mapping), "a mapping"
    else:
        return
    if not ok:
        raise ConfigError(f"config key {key}: expected {want} (like the default {default!r}), "
                          f"got {value!r} ({type(value).__name__})")


def _refuse_renamed(cfg: Mapping, defaults: Mapping, where: str = "") -> None:
    """A ConfigError naming each renamed key of `cfg` (mixup_transfer.core.vocabulary.RENAMED) and
    the key to use."""
    from mixup_transfer.core.vocabulary import renamed_keys, renamed_message

    found = renamed_keys(dict(cfg), dict(defaults))
    if found:
        raise ConfigError(renamed_message(found, where))


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (),
                defaults: Mapping | None = None) -> dict:
    """Read a YAML config with its `_BASE_` chain, apply overrides, validate against `defaults` (a
    renamed key is an error naming the file, or the override, and the key to use)."""
    data = _load_with_bases(Path(path))
    if defaults is not None:
        _refuse_renamed(data, defaults, str(path))
    cfg = apply_overrides(data, overrides)
    if defaults is not None:
        cfg = validate(cfg, defaults)
    return cfg


def dump_config(cfg: Mapping) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None)


_OPS = {">": lambda v, b: v > b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b,
        "<=": lambda v, b: v <= b}


def check_ranges(cfg: Mapping, ranges: Mapping[str, tuple]) -> None:
    """Each dotted key's value (when not None) must satisfy every (op, bound) pair of
    `ranges[key]`, e.g. ``{"optim.epochs": (">", 0), "optim.momentum": (">=", 0, "<", 1)}``; or be
    one of a set of choices (``("in", ("sgd", "adam"))``). The error names the key, the value and
    the allowed range."""
    for key, rule in ranges.items():
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            continue
        if rule[0] == "in":
            if node not in rule[1]:
                raise ConfigError(f"config key {key}: {node!r} is not one of {list(rule[1])}")
            continue
        pairs = list(zip(rule[::2], rule[1::2]))
        try:
            ok = all(_OPS[op](node, bound) for op, bound in pairs)
        except TypeError:  # a string where a number belongs
            raise ConfigError(f"config key {key}: expected a number, got {node!r} "
                              f"({type(node).__name__})") from None
        if not ok:
            allowed = " and ".join(f"{op} {bound}" for op, bound in pairs)
            raise ConfigError(f"config key {key}: {node!r} is out of range (must be {allowed})")
