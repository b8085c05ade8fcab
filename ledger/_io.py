"""Bounded reads of regular files: what every reader of untrusted paths goes through.

A path handed to the verifier (a ledger's ``wal.log``, a key, a manifest, a model, a checkpoint
file) may name a FIFO, a device such as ``/dev/zero``, a directory or a file far larger than the
format allows. Opening with ``O_NONBLOCK`` means a FIFO without a writer does not block the open;
``fstat`` on the opened descriptor (not the path, which could be swapped) then refuses anything that
is not a regular file, and the size is checked before a byte is read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ledger.errors import FormatError, LedgerError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@contextmanager
def open_regular(path: str | os.PathLike[str], *, what: str, limit: int | None = None,
                 error: type[LedgerError] = FormatError) -> Iterator[BinaryIO]:
    """Open ``path`` for binary reading when it is a regular file of at most ``limit`` bytes;
    otherwise raise ``error`` saying what ``what`` (e.g. "key file") is and what is wrong.
    A missing file raises :class:`FileNotFoundError` (callers decide whether absence is fine)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise error(f"{what} {os.fsdecode(path)!s} is a directory, not a file") from None
    except OSError as exc:
        raise error(f"cannot open {what} {os.fsdecode(path)!s}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) \
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file"
            raise error(f"{what} {os.fsdecode(path)!s} is {kind}; give a regular file")
        if limit is not None and info.st_size > limit:
            raise error(f"{what} {os.fsdecode(path)!s} is {info.st_size} bytes, more than the {limit} "
                        "this format allows")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def read_regular(path: str | os.PathLike[str], *, what: str, limit: int,
                 error: type[LedgerError] = FormatError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`). A file
    that grows past the limit while being read is refused too."""
    with open_regular(path, what=what, limit=limit, error=error) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} {os.fsdecode(path)!s} grew past the {limit} bytes this format allows")
    return data


def is_regular(path: Path) -> bool:
    """True when ``path`` is a regular file (following symlinks), without opening it."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


__all__ = ["GiB", "KiB", "MiB", "is_regular", "open_regular", "read_regular"]
