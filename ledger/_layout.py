"""Where things live inside a ledger directory, and the file-system primitives of the write side.

Every byte the writer puts on disk goes through :func:`write_all` (one ``os.write`` loop), so a
failing or short write is seen in one place and fault-injection tests can reach every write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ledger.errors import LedgerLockedError, NotALedgerError, StorageError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class _Inherited(Protocol):
    def _drop_in_child(self) -> None: ...


_HELD: weakref.WeakSet[Any] = weakref.WeakSet()  # live locks and logs whose descriptors a fork copies


def close_in_forked_children(owner: _Inherited) -> None:
    """Have a child forked from this process close ``owner``'s descriptors (its ``_drop_in_child``)
    right after the fork: a DataLoader worker or a ``multiprocessing`` child must not keep the
    ledger's lock (an ``flock`` belongs to the open file, which a fork shares) or its log."""
    _HELD.add(owner)


def _after_fork_in_child() -> None:
    for owner in list(_HELD):
        with contextlib.suppress(OSError):
            owner._drop_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True, slots=True)
class Layout:
    """Paths of one ledger directory."""

    root: Path

    @property
    def parts(self) -> Path:
        """Directory of immutable Parquet parts."""
        return self.root / "parts"

    @property
    def wal(self) -> Path:
        """The write-ahead log (open tail)."""
        return self.root / "wal.log"

    @property
    def manifest(self) -> Path:
        """The manifest (a convenience index; never trusted by verify)."""
        return self.root / "manifest.json"

    def is_ledger(self) -> bool:
        """True when the directory looks like a ledger (has parts/ or a log)."""
        return self.root.is_dir() and (self.parts.is_dir() or self.wal.is_file())

    def require(self) -> Layout:
        """Return self, or raise :class:`NotALedgerError` with what to do."""
        if not self.root.exists():
            raise NotALedgerError(f"{self.root} does not exist")
        if not self.root.is_dir():
            raise NotALedgerError(f"{self.root} is a file, not a ledger directory")
        if not self.is_ledger():
            raise NotALedgerError(f"{self.root} is not a ledger (no parts/ and no wal.log inside)")
        return self


# --------------------------------------------------------------------- writing
def write_all(fd: int, data: bytes | memoryview) -> int:
    """Write all of ``data`` to ``fd`` (``os.write`` until done). On an error, the exception gets
    ``written`` = how many bytes did land before it; returns ``len(data)``."""
    view, done = memoryview(data), 0
    while done < len(view):
        try:
            done += os.write(fd, view[done:])
        except OSError as exc:
            exc.written = done  # type: ignore[attr-defined]
            raise
    return done


class FdSink:
    """A write-only file object over a descriptor for pyarrow (every write through
    :func:`write_all`); hashes what it writes."""

    def __init__(self, fd: int) -> None:
        self.fd, self.closed, self._size, self.sha256 = fd, False, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        """Write all of ``data``."""
        write_all(self.fd, data)
        self.sha256.update(data)
        self._size += len(data)
        return len(data)

    def tell(self) -> int:
        """Bytes written so far."""
        return self._size

    def flush(self) -> None:
        """Nothing is buffered here."""

    def close(self) -> None:
        """Mark closed; the descriptor belongs to the caller."""
        self.closed = True

    def writable(self) -> bool:
        """Always."""
        return True


def create_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (never replacing one), write ``data`` and fsync it; on failure nothing is
    left at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory (makes a rename or a new name in it durable)."""
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it is there (cleanup after a failure; errors are ignored)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; returns the directories created, outermost first
    (what :func:`remove_dirs` undoes). Raises ``OSError``; undoes its own work first."""
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe):  # an existing file on the way makes mkdir say ENOTDIR
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    made: list[Path] = []
    try:
        for directory in reversed(missing):
            os.mkdir(directory)
            made.append(directory)
    except BaseException:
        remove_dirs(made)
        raise
    return made


def remove_dirs(made: list[Path]) -> None:
    """Remove directories :func:`make_dirs` created, innermost first, only while they are empty."""
    for directory in reversed(made):
        try:
            os.rmdir(directory)
        except OSError:
            return


# --------------------------------------------------------------------- the writer's lock
class DirectoryLock:
    """One writer per ledger: an exclusive ``flock`` on a descriptor of the ledger directory itself.

    Nothing can be deleted out from under it (unlike a lock file), it survives the log being
    replaced at roll-over, and the kernel releases it when the process dies."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
        except OSError as exc:
            raise StorageError(f"cannot open {root} to lock it: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LedgerLockedError(f"{root} is open by another writer; close it first "
                                        "(readers and `ledger verify` need no lock)") from None
            raise StorageError(f"cannot lock {root}: {exc.strerror or exc}") from exc
        self._fd = fd
        close_in_forked_children(self)

    def moved(self) -> str | None:
        """Why the path no longer names the locked directory (renamed, removed or replaced under
        the writer), or None while it does: what is written by path must not land elsewhere."""
        if self._fd < 0:
            return "the lock was released"
        held = os.fstat(self._fd)
        try:
            now = os.stat(self.root)
        except OSError as exc:
            return f"{self.root} is gone ({exc.strerror or exc})"
        if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            return f"{self.root} is now another directory (the locked one was renamed or replaced)"
        return None

    def _drop_in_child(self) -> None:
        """In a forked child: close this copy of the descriptor (not LOCK_UN, which would
        release the parent's lock too); the child holds no lock."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd >= 0

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
