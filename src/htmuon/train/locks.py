"""Lock files for run folders: a cell of ``htmuon compare`` (``cell.lock``) and a training run
(``run.lock``, :func:`htmuon.train.loop.train`), so that two processes never run or resume the same
folder at once.

A lock is a file created with ``O_EXCL`` holding ``"PID HOST"``. A lock whose process is dead (on this
host) is taken over; so is one that cannot be parsed once it is older than :data:`UNPARSABLE_STALE_S`
(a process killed between creating the file and writing its PID leaves it empty).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

#: An empty or garbled lock file older than this (seconds) is a leftover, not a lock being written.
UNPARSABLE_STALE_S = 30.0


def _lock_owner(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except FileNotFoundError:
        return None
    except ValueError:  # being written right now, or foreign: treat as held
        return -1, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(path: Path) -> bool:
    """True when the lock at ``path`` names a dead process on this host (or is gone), or cannot be parsed
    and is older than :data:`UNPARSABLE_STALE_S`."""
    owner = _lock_owner(path)
    if owner is None:
        return True
    pid, host = owner
    if pid == -1:
        try:
            return time.time() - path.stat().st_mtime > UNPARSABLE_STALE_S
        except FileNotFoundError:
            return True
    return pid > 0 and host == socket.gethostname() and not _alive(pid)


def lock_holder(path: Path) -> str:
    """Who holds the lock at ``path``: "process PID on HOST", "unreadable" or "released"."""
    owner = _lock_owner(path)
    if owner is None:
        return "released"
    pid, host = owner
    return "unreadable" if pid == -1 else f"process {pid} on {host}"


def describe_owner(path: Path) -> str:
    """The lock at ``path`` and who holds it, for a message."""
    return f"'{path}' ({lock_holder(path)})"


def acquire_lock(path: Path) -> bool:
    """Create ``path`` with O_EXCL holding "PID HOST"; take over a lock of a dead process. False if held.

    A takeover is itself guarded by an O_EXCL "PATH.takeover" file, so two processes that both find
    a stale lock cannot remove each other's fresh one."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not lock_is_stale(path):
                return False
            guard = path.with_name(path.name + ".takeover")
            if not acquire_lock_plain(guard):
                return False
            try:
                if lock_is_stale(path):
                    path.unlink(missing_ok=True)
            finally:
                guard.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return True
    return False


def acquire_lock_plain(path: Path) -> bool:
    """O_EXCL create of ``path`` with "PID HOST"; a leftover of a dead process is removed first."""
    if path.exists() and lock_is_stale(path):
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


def release_lock(path: Path) -> None:
    """Remove ``path`` if this process holds it."""
    if _lock_owner(path) == (os.getpid(), socket.gethostname()):
        path.unlink(missing_ok=True)
