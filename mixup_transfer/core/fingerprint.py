"""Run fingerprints: what a run directory was made from (resolved config, code version, hashes of
its input files), so that a resume or a reuse with anything different is refused, naming the
difference."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

from mixup_transfer.core.config import ConfigError

log = logging.getLogger(__name__)

FILE = "fingerprint.json"


class FingerprintMismatch(ConfigError):
    """A run directory was made from another config or other inputs than the ones given now."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the toolkit's checkout (with "+dirty" for local changes), or "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make(config: Mapping, inputs: Mapping[str, str | os.PathLike | None]) -> dict:
    """{"config": the resolved config, "inputs": {name: {"path", "sha256"}}, "code":
    code_version()}."""
    hashed = {}
    for name, path in sorted(inputs.items()):
        hashed[name] = None if path is None else {"path": str(path), "sha256": file_sha256(path)}
    return {"config": json.loads(json.dumps(config, default=str)), "inputs": hashed,
            "code": code_version()}


def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, Mapping):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def differences(old: Mapping, new: Mapping, may_change: Iterable[str] = ()) -> list[str]:
    """Dotted config keys and input names that differ between two fingerprints (`may_change`: glob
    patterns of config keys that a resume may change, e.g. runtime.*)."""
    a, b = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
    patterns = list(may_change)
    out = [f"config.{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
           for k in sorted(set(a) | set(b))
           if a.get(k, "<absent>") != b.get(k, "<absent>")
           and not any(fnmatch.fnmatch(k, p) for p in patterns)]
    ia, ib = old.get("inputs") or {}, new.get("inputs") or {}
    for name in sorted(set(ia) | set(ib)):
        sa, sb = (ia.get(name) or {}).get("sha256"), (ib.get(name) or {}).get("sha256")
        if sa != sb:
            out.append(f"input {name}: {(ia.get(name) or {}).get('path')} ({str(sa)[:12]}) -> "
                       f"{(ib.get(name) or {}).get('path')} ({str(sb)[:12]})")
    return out


RESTART = "use another run directory, or --force to start over"


def check(run_dir: str | os.PathLike, current: Mapping, may_change: Iterable[str] = (),
          restart: str = RESTART) -> None:
    """Refuse (FingerprintMismatch) when `run_dir/fingerprint.json` differs from `current`; a
    different code version is logged, not refused (resuming after a fix is legitimate). No stored
    fingerprint: nothing to compare (a run folder without one). `restart`: how to start over with
    the calling tool's flags."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FingerprintMismatch(f"{path}: unreadable fingerprint ({e}); {restart}") from e
    diff = differences(stored, current, may_change)
    if diff:
        raise FingerprintMismatch(
            f"{run_dir}: was made from another config or other inputs; refusing to mix them "
            f"({restart}). Differences: " + "; ".join(diff))
    if stored.get("code") != current.get("code"):
        log.warning("%s: made with code %s, continuing with %s", run_dir, stored.get("code"),
                    current.get("code"))


def write(run_dir: str | os.PathLike, current: Mapping) -> None:
    from mixup_transfer.core.runtime import atomic_write_text

    atomic_write_text(json.dumps(current, indent=1) + "\n", Path(run_dir) / FILE)
