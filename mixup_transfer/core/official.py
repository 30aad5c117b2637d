"""Fixtures from the authors' code: the numbers an official function gives on seeded inputs, kept
as `<name>.npz` beside an index, `official_fixtures.json`, that notes for each file the
repository, commit and functions it comes from (the tools/make_*_fixture*.py scripts write them).
"""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import numpy as np

from mixup_transfer.core.basics import atomic_path, atomic_write_text

INDEX = "official_fixtures.json"


def checkout_commit(root: str | Path) -> str:
    """The commit of a checkout of the authors' repository: `git rev-parse HEAD` where `root` is
    the top of a git work tree, else the first line of `root/COMMIT` (a `git archive` export has
    no `.git`; a folder inside another repository is not taken for that repository's commit)."""
    root = Path(root)
    try:
        lines = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        if len(lines) == 2 and Path(lines[0]).resolve() == root.resolve():
            return lines[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    stamp = root / "COMMIT"
    text = stamp.read_text().strip() if stamp.is_file() else ""
    if not text:
        raise FileNotFoundError(errno.ENOENT, "not a git checkout and no commit in a COMMIT file "
                                "(every fixture's note names the commit of the authors' code)",
                                str(stamp))
    return text.splitlines()[0].strip()


def write_fixture(out: str | Path, name: str, arrays: dict, note: dict) -> Path:
    """Write `out/name` (`np.savez_compressed` of `arrays`), then set `note` as the entry `name` of
    `out/official_fixtures.json`: the other entries and their order stay, a new name goes last.
    Both files are written atomically; the path of the `.npz` is returned."""
    if not name.endswith(".npz"):
        raise ValueError(f"a fixture's name ends with .npz: {name!r}")
    out = Path(out)
    path = out / name
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    index = out / INDEX
    entries = json.loads(index.read_text()) if index.is_file() else {}
    entries[name] = note
    atomic_write_text(json.dumps(entries, indent=2) + "\n", index)
    return path
