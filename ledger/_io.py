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
            raise error(f"{what} {os.fsdecode(path)!s} is {file_kind(info.st_mode)}; give a regular file")
        if limit is not None and info.st_size > limit:
            raise error(f"{what} {os.fsdecode(path)!s} is {info.st_size} bytes, more than the {limit} "
                        "this format allows")
        # the descriptor stays non-blocking: a regular file ignores it, anything that would block
        # (a /proc file such as kmsg) fails the read instead of hanging it
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message: "a directory", "a FIFO", …"""
    return "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
        "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a symlink" if stat.S_ISLNK(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def read_regular(path: str | os.PathLike[str], *, what: str, limit: int,
                 error: type[LedgerError] = FormatError, appended: bool = False) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`): as many as
    its size says, so a small file costs little whatever the limit. One that changes size while it
    is read is refused; one whose size is 0 is empty and is not read (a /proc file reports 0).
    ``appended``: the file is append-only and may grow while it is read (a live ledger's log): the
    bytes it held when opened are returned, and what a writer appends meanwhile is left for later."""
    with open_regular(path, what=what, limit=limit, error=error) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:  # empty by its own account: not read (a /proc file says 0 and reads, or consumes, more)
            return b""
        try:
            # what the file says it holds (≤ limit), and one byte to see whether it grew
            data = handle.read(size if appended else size + 1)
        except BlockingIOError:
            raise error(f"{what} {os.fsdecode(path)!s} blocks when read; give a regular file") from None
    if data is None or len(data) > size or (appended and len(data) < size):
        raise error(f"{what} {os.fsdecode(path)!s} changed size while it was read; read it again when it is "
                    "complete")
    return data



__all__ = ["GiB", "KiB", "MiB", "file_kind", "open_regular", "read_regular"]
