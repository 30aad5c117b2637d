"""YAML configs, translated once at the edge into plain dicts.

- `_BASE_: other.yaml` (path relative to the file that names it; a list is allowed) is loaded first
  and deep-merged under the file.
- `KEY=VALUE` overrides use dotted keys (`optim.lr=0.05`); values are parsed as YAML (`true`, `[1, 2]`).
- With `defaults` (a nested dict declaring every valid key), unknown keys are an error that lists the
  valid ones, and keys the file leaves out take their defaults.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterable, Mapping

import yaml


class ConfigError(ValueError):
    pass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
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
            value = yaml.safe_load(raw) if raw != "" else ""
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


def validate(cfg: Mapping, defaults: Mapping, where: str = "") -> dict:
    """Fill missing keys from `defaults`; reject keys `defaults` does not declare.

    A default of `None` or a non-dict value accepts any value; a dict default is checked recursively
    unless it is empty (a free-form mapping).
    """
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
            out[k] = copy.deepcopy(cfg[k])
    return out


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (),
                defaults: Mapping | None = None) -> dict:
    """Read a YAML config with its `_BASE_` chain, apply overrides, validate against `defaults`."""
    cfg = apply_overrides(_load_with_bases(Path(path)), overrides)
    if defaults is not None:
        cfg = validate(cfg, defaults)
    return cfg


def dump_config(cfg: Mapping) -> str:
    return yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None)
