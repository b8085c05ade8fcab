"""Signed tree heads beside a ledger: ``LEDGER/heads/<size>.note`` (docs/FORMAT.md §13).

The writer puts every head it signs here (each checkpoint's head as it is written, the final head
at seal): one C2SP signed note per file, written under a temporary name, fsynced and linked into
place, never rewritten. These files are what a lab posts; the ledger does not depend on them (a
missing one is fine, the checkpoint entries carry the same heads, and a reopening writer rebuilds
the ones a crash left out: :func:`unpublished`). Other files in ``heads/`` (the
timestamp tokens ``<size>.tsr``) are not read here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ledger._crypto import verify_bytes
from ledger._io import file_kind, read_regular
from ledger._layout import create_file, fsync_dir, unlink_quietly
from ledger._note import MAX_NOTE_BYTES, TreeHead, note_from_signature
from ledger.errors import FormatError

HEADS_DIR = "heads"
MAX_HEADS = 100_000  # a head per checkpoint: far more than any run writes
_NAME = re.compile(r"(0|[1-9][0-9]{0,19})\.note")


def heads_dir(ledger_dir: str | os.PathLike[str]) -> Path:
    """The directory of a ledger's published heads."""
    return Path(ledger_dir) / HEADS_DIR


def head_name(size: int) -> str:
    """The file name of the head of ``size`` entries: ``<size>.note``."""
    return f"{int(size)}.note"


def write_head(ledger_dir: str | os.PathLike[str], size: int, note: bytes) -> bool:
    """Write ``heads/<size>.note`` durably (temporary file, fsync, link, fsync of the directory).
    Returns False when the same bytes are already there; raises :class:`FormatError` when a
    different head of that size is (two heads of one size: a fork, never overwritten) and
    ``OSError`` when the disk refuses."""
    directory = heads_dir(ledger_dir)
    try:
        os.mkdir(directory)
        fsync_dir(Path(ledger_dir))
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(directory).st_mode):
            raise FormatError(f"{directory} is {file_kind(os.lstat(directory).st_mode)}, not a directory") from None
    path = directory / head_name(size)
    if os.path.lexists(path):
        return _same(path, note)
    tmp = directory / f".{head_name(size)}.{secrets.token_hex(6)}.tmp"
    create_file(tmp, note)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return _same(path, note)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(path):  # a file system without hard links: a checked rename
            return _same(path, note)
        os.rename(tmp, path)
    finally:
        unlink_quietly(tmp)
    fsync_dir(directory)
    return True


def _same(path: Path, note: bytes) -> bool:
    if _read(path) != note:
        raise FormatError(f"{path} already holds a different head of that size (a fork); it is never overwritten")
    return False


def _read(path: Path) -> bytes:
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise FormatError(f"{path} is {file_kind(info.st_mode)}, not a regular file")
    return read_regular(path, what="tree head", limit=MAX_NOTE_BYTES)


def list_heads(ledger_dir: str | os.PathLike[str]) -> list[tuple[int, bytes]]:
    """Every ``heads/<size>.note`` of a ledger as (size, note bytes), sorted by size; [] when
    there is no ``heads/``. Bounded: at most :data:`MAX_HEADS` files of at most
    :data:`~ledger._note.MAX_NOTE_BYTES` each; a symlink, a non-regular file or a ``heads`` that
    is not a directory raises :class:`FormatError` naming it. Other names are ignored."""
    directory = heads_dir(ledger_dir)
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(info.st_mode):
        raise FormatError(f"{directory} is {file_kind(info.st_mode)}, not a directory")
    found: list[tuple[int, Path]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if _NAME.fullmatch(entry.name):
                found.append((int(entry.name[:-5]), directory / entry.name))
                if len(found) > MAX_HEADS:
                    raise FormatError(f"{directory} holds more than {MAX_HEADS} heads")
    found.sort()
    out = []
    for size, path in found:
        with contextlib.suppress(FileNotFoundError):  # removed while listed: not there
            out.append((size, _read(path)))
    return out


def unpublished(ledger_dir: str | os.PathLike[str], origin: str, public_raw: bytes,
                checkpoints: Iterable[tuple[int, Any]]) -> list[tuple[int, bytes]]:
    """The signed notes of checkpoint heads missing from ``heads/``: for each (seq, body) of a
    checkpoint entry whose ``tree_head`` states its seq and verifies under ``public_raw``, the note
    :func:`~ledger._note.note_from_signature` rebuilds, when ``heads/<seq>.note`` is absent (a
    writer killed between the entry and the file). Unreadable fields are left to verify."""
    from ledger._schema import RecordedHead

    directory, out = heads_dir(ledger_dir), []
    for seq, body in checkpoints:
        try:
            head = RecordedHead.from_body(body.get("tree_head") if isinstance(body, dict) else None)
        except FormatError:
            continue
        if head is None or head.size != seq or os.path.lexists(directory / head_name(seq)):
            continue
        signed = TreeHead(origin, head.size, head.root)
        if verify_bytes(public_raw, signed.text(), head.signature):
            out.append((seq, note_from_signature(signed, public_raw, head.signature)))
    return out


__all__ = ["HEADS_DIR", "head_name", "heads_dir", "list_heads", "unpublished", "write_head"]
