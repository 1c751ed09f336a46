"""Lock files for run folders: a cell of ``htmuon compare`` (``cell.lock``) and a training run
(``run.lock``, :func:`htmuon.train.loop.train`), so that two processes never run or resume the same
folder at once.

A lock is a file created with ``O_EXCL`` holding ``"PID HOST"``. A lock whose process is dead (on this
host), and whose ``flock`` no live process holds (a process of another PID namespace under this host
name does), is taken over; so is one that names this very process (its PID on this host) but that this
process did not take and that no live process holds: a run killed while it was PID 1 of a container
finds its own PID in its lock when the container restarts. Every taker keeps an ``flock`` on its lock
file (and the file open, so its inode is not reused) until it releases it; the kernel drops a dead
process's flock and sees those of every PID namespace, so a live PID 1 of another container on the
same hostname still holds its lock. A lock that cannot be parsed is taken over once it is older than
:data:`UNPARSABLE_STALE_S` (a process killed between creating the file and writing its PID leaves it
empty). This process keeps the identity (device, inode) of every lock file it created and still holds.

A takeover (the check that a lock is stale and its removal) is done by one process at a time: it holds
an exclusive ``flock`` on ``PATH.takeover``, which the kernel releases when its process dies, so a
taker killed half-way leaves nothing that blocks the next one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the takeover guard is an O_EXCL file (see _takeover_guard)
    fcntl = None  # type: ignore[assignment]

#: An empty or garbled lock file older than this (seconds) is a leftover, not a lock being written.
UNPARSABLE_STALE_S = 30.0

#: (st_dev, st_ino) of each lock file this process created and has not released -> the descriptor on
#: which it holds an ``flock`` of that file for as long as it holds the lock (None without flock).
_taken: dict[tuple[int, int], int | None] = {}


def _read(path: Path) -> tuple[int, str, tuple[int, int]] | None:
    """(PID, HOST, (device, inode)) of the lock at ``path`` from one open of it; PID -1 when it cannot
    be parsed (being written, or foreign); None when there is no lock."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            st = os.fstat(f.fileno())
            text = f.read()
    except FileNotFoundError:
        return None
    ident = (st.st_dev, st.st_ino)
    try:
        pid, host = text.split()
        pid = int(pid)
    except ValueError:
        return -1, "", ident
    return (pid, host, ident) if pid > 0 else (-1, "", ident)


def _lock_owner(path: Path) -> tuple[int, str] | None:
    lock = _read(path)
    return None if lock is None else lock[:2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holds_lock(path: Path) -> bool:
    """True when this process took the lock at ``path`` (:func:`acquire_lock`) and still holds it."""
    lock = _read(path)
    return lock is not None and lock[:2] == (os.getpid(), socket.gethostname()) and lock[2] in _taken


def lock_is_stale(path: Path) -> bool:
    """True when the lock at ``path`` is gone or left behind: it names a process not alive on this host
    whose lock no live process holds the ``flock`` of (:func:`_flock_held`: one in another PID
    namespace under this host name does), or
    this process's own PID on this host although this process did not take it and no live process
    holds its flock (a PID reused, e.g. a restarted container's PID 1: :func:`_unheld`), or it cannot
    be parsed and is older than :data:`UNPARSABLE_STALE_S`.
    A lock this process holds is not stale."""
    lock = _read(path)
    if lock is None:
        return True
    pid, host, ident = lock
    if pid == -1:
        try:
            return time.time() - path.stat().st_mtime > UNPARSABLE_STALE_S
        except FileNotFoundError:
            return True
    if host != socket.gethostname():
        return False  # a process on another host cannot be checked: held
    if pid == os.getpid():  # this PID, on this host: ours, a leftover, or another namespace's process
        return ident not in _taken and _unheld(path)
    # a PID not alive here may be alive in another PID namespace under this host name (containers on the
    # host's network): its flock, which the kernel shows across namespaces, says so
    return not _alive(pid) and not _flock_held(path)


def _unheld(path: Path) -> bool:
    """True when no process holds the ``flock`` that every lock's taker keeps on it (:func:`_create`):
    its taker is dead. The kernel drops a dead process's flock, and sees the flocks of processes in
    every PID namespace, so a live process of another container that reports the same PID and host
    (PID 1 of two containers on the host's network) still holds its lock. False where it cannot tell
    (no ``flock`` on this file system): held."""
    return _flock_state(path) == "free"


def _flock_held(path: Path) -> bool:
    """True when a live process holds the ``flock`` of the lock file at ``path`` (every taker keeps
    one: :func:`_create`); False when none does, or where it cannot tell (no ``flock`` here: the PID
    and host alone decide, as before)."""
    return _flock_state(path) == "held"


def _flock_state(path: Path) -> str:
    """``"held"`` (a live process holds the file's ``flock``), ``"free"`` (none does, or the file is
    gone) or ``"unknown"`` (no ``flock`` on this file system), by a non-blocking probe."""
    if fcntl is None:
        return "unknown"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "free"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError:  # no flock on this file system
        return "unknown"
    else:
        return "free"
    finally:
        os.close(fd)  # (drops the probe's own flock, if it got one)


def lock_holder(path: Path) -> str:
    """Who holds the lock at ``path``: "process PID on HOST", "unreadable" or "released"."""
    owner = _lock_owner(path)
    if owner is None:
        return "released"
    pid, host = owner
    return "unreadable" if pid == -1 else f"process {pid} on {host}"


def describe_owner(path: Path) -> str:
    """The lock at ``path`` and who holds it, for a message; a lock of another host (held, as it cannot be
    checked from here: :func:`lock_is_stale`) says how to free it if its process is gone (a machine, or a
    container restarted under another host name, would otherwise wait or be refused forever)."""
    owner = _lock_owner(path)
    if owner is not None and owner[0] != -1 and owner[1] != socket.gethostname():
        return (
            f"'{path}' ({lock_holder(path)}, another host: it cannot be checked from here; delete the lock "
            "if that process is gone)"
        )
    return f"'{path}' ({lock_holder(path)})"


def _create(path: Path) -> bool:
    """O_EXCL create of ``path`` holding "PID HOST", recorded as taken; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    st = os.fstat(fd)
    held = None
    if fcntl is not None:  # held until release: tells a dead taker from a live one (see _unheld)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.dup(fd)
        except OSError:
            held = None  # no flock on this file system: the PID and host alone tell
    _taken[(st.st_dev, st.st_ino)] = held
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    return True


#: flock's errors on a file system without locks.
_NO_FLOCK = (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


@contextlib.contextmanager
def _takeover_guard(path: Path) -> Iterator[bool]:
    """Yield True while this process alone may take over the lock at ``path`` (False: another process
    is taking it over right now).

    An exclusive non-blocking ``flock`` on ``PATH.takeover``: the kernel drops it when its holder dies,
    so a guard is never stale. The file is removed while the flock is held; a process that locked the
    file just removed (it opened it before the removal) sees that the path no longer names its file
    and opens it again. Without ``flock`` (not POSIX, or a file system without locks) the guard is the
    file itself, created with O_EXCL, and one left by a dead process is removed first."""
    guard = path.with_name(path.name + ".takeover")
    if fcntl is None:
        yield from _excl_guard(guard)
        return
    for _ in range(3):
        try:
            fd, made = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
        except FileExistsError:
            try:
                fd, made = os.open(guard, os.O_RDWR), False
            except FileNotFoundError:
                continue  # removed just now by the taker before this one
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                if made:  # this process made the O_EXCL file: it holds the guard
                    st = os.fstat(fd)
                    _taken[(st.st_dev, st.st_ino)] = None
                    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                    try:
                        yield True
                    finally:
                        release_lock(guard)
                else:
                    yield from _excl_guard(guard)
                return
            try:
                same = os.stat(guard).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue  # removed by the taker before this one: open the new file
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            try:
                yield True
            finally:
                guard.unlink(missing_ok=True)  # still under the flock: no other taker is in here
            return
        finally:
            os.close(fd)
    yield False


def _excl_guard(guard: Path) -> Iterator[bool]:
    """The guard without ``flock``: an O_EXCL file; one left by a dead process is removed first (two
    takers that both find such a leftover can both win: file systems without locks only)."""
    if guard.exists() and lock_is_stale(guard):
        guard.unlink(missing_ok=True)
    if not _create(guard):
        yield False
        return
    try:
        yield True
    finally:
        release_lock(guard)


def acquire_lock(path: Path) -> bool:
    """Create ``path`` with O_EXCL holding "PID HOST"; take over a stale lock (see
    :func:`lock_is_stale`). False if it is held (by another process, or already by this one).

    A takeover is guarded (:func:`_takeover_guard`), so two processes that both find a stale lock
    cannot remove each other's fresh one."""
    for _ in range(3):
        if _create(path):
            return True
        if not lock_is_stale(path):
            return False
        with _takeover_guard(path) as alone:
            if not alone:
                return False
            if lock_is_stale(path):  # again, now that no other taker can replace it
                path.unlink(missing_ok=True)
    return False


def release_lock(path: Path) -> None:
    """Remove ``path`` if this process took it and holds it; nothing otherwise."""
    lock = _read(path)
    if lock is None:
        return
    if lock[:2] == (os.getpid(), socket.gethostname()) and lock[2] in _taken:
        path.unlink(missing_ok=True)
        held = _taken.pop(lock[2])
        if held is not None:
            os.close(held)  # drops the flock
