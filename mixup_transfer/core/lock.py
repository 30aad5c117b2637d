"""One writer per run folder: an exclusive lock file, and the clean-up of a killed run's `.tmp`
files.

`run_lock(folder)` creates `folder/.lock` (pid, host, process start time, command line) atomically:
the content is written to a private file first and then hard-linked to `.lock`, which fails when
the lock exists, so a second writer can never see a half-written lock. A second writer is refused
(`RunLockedError`, exit 1) with a message naming the holder. A lock whose process is gone (same
host, no such pid, or the pid now belongs to a process started later) is stale: it is replaced and
logged. The lock is removed when the block exits (also on an exception or Ctrl-C); a killed process
leaves it behind as a stale lock.

Under torchrun only rank 0 takes the lock (the other ranks of the same job are the same writer).

On taking the lock, the `.tmp` files that atomic writes (`mixup_transfer.core.basics.atomic_path`,
`<name>.<pid>.tmp`) of a killed run left under the folder are removed: those whose process is gone
and which are older than this one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the folder's lock."""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _holder_alive(holder: dict) -> bool:
    """Whether the process described by a lock file still runs (True when that cannot be told:
    other host; False for an unreadable lock that stayed unreadable: a process killed while writing
    it)."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    started = holder.get("start_time")
    return started is None or _start_time(pid) in (None, started)  # else: the pid was reused


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: never a live lock (the content is complete before the link exists)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {since}: "
            f"{holder.get('command', '?')}")


def _try_link(content: str, path: Path) -> bool:
    """Create `path` holding `content` unless it exists: a hard link of a complete private file
    (never seen half written), or an exclusive create where the file system has no hard links."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.new")
    tmp.write_text(content)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network / FUSE file systems)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def acquire(folder: str | os.PathLike, what: str = "run") -> Path:
    """Take `folder/.lock` (creating the folder); RunLockedError when a live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()),
          "time": time.time(), "command": " ".join(os.sys.argv)[:300], "what": what}
    for _ in range(25):
        if _try_link(json.dumps(me), path):
            return path
        holder = _read_holder(path)
        if holder is None:
            continue  # released meanwhile
        if not holder and _age(path) < 10:  # being written by an exclusive create: look again
            time.sleep(0.5)
            continue
        if _holder_alive(holder):
            raise RunLockedError(
                f"{folder}: another process is writing this {what} folder ({_describe(holder)}); "
                "wait for it to finish or choose another folder. If that process no longer "
                f"runs, delete {path}")
        log.warning("%s: removing the stale lock of a process that no longer runs (%s)", path,
                    _describe(holder))
        with contextlib.suppress(FileNotFoundError):
            stale = path.with_name(f"{path.name}.{os.getpid()}.stale")
            # one remover wins; a new live lock created meanwhile is never deleted
            os.replace(path, stale)
            if _read_holder(stale) == holder:
                stale.unlink()
            # a live lock replaced the stale one between the read and the rename: put it back
            else:
                os.replace(stale, path)
    raise RunLockedError(f"{path}: could not take the lock (it keeps changing hands)")


def release(path: Path) -> None:
    holder = _read_holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Remove `<name>.<pid>.tmp` files under `folder` left by processes that no longer run (and
    written before
    now: a live rank of this job on another node starts writing later): what an atomic write of a
    killed run leaves. Returns the removed paths."""
    started, removed = time.time(), []
    for p in Path(folder).rglob("*.tmp"):
        parts = p.name.rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        with contextlib.suppress(OSError):
            if (
                pid != os.getpid()
                and not pid_alive(pid)
                and p.is_file()
                and p.stat().st_mtime < started
            ):
                p.unlink()
                removed.append(p)
    if removed:
        log.info("%s: removed %d leftover .tmp file(s) of a killed run", folder, len(removed))
    return removed


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike | None, what: str = "run"):
    """Hold `folder`'s lock for the block (rank 0 only; no-op for None) and clean a killed run's
    `.tmp` files."""
    if folder is None or not _is_rank_zero():
        yield
        return
    path = acquire(folder, what)
    try:
        remove_stale_tmp(folder)
        yield
    finally:
        release(path)
