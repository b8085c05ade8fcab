"""The write-ahead log: the open tail of a ledger, one framed entry after another.

File ``wal.log`` = 8-byte magic ``TLWAL1\\n\\0`` then frames. Frame = u32 BE payload length ‖
u32 BE CRC-32 (zlib) of the payload ‖ payload, payload = key id (32) ‖ signature (64) ‖ record.
Appends go through ``os.write`` on an ``O_APPEND`` descriptor, so once ``append`` returns the
frame is in the OS page cache and survives the process being killed. A write that fails part-way
is cut back (``ftruncate``) to the last whole frame; if even that fails the writer refuses every
later append, so no frame is ever written after a torn one.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from ledger._entry import Entry
from ledger._io import MiB, read_regular
from ledger._layout import close_in_forked_children, unlink_quietly, write_all
from ledger._record import HASH_SIZE, MAX_RECORD_BYTES, SIGNATURE_SIZE
from ledger.errors import FormatError, StorageError

MAGIC = b"TLWAL1\n\x00"
FRAME = struct.Struct(">II")
_PREFIX = HASH_SIZE + SIGNATURE_SIZE
MAX_FRAME = HASH_SIZE + SIGNATURE_SIZE + MAX_RECORD_BYTES  # key id ‖ signature ‖ record (§2)
MAX_LOG = 192 * MiB  # a writer rolls at ≤ 128 MiB (rollover_bytes) and a frame is ≤ 64 MiB over that
MAX_LOG_FRAMES = 65536  # 8 × the 8192 entries of a roll-over: room for rolls that failed and were retried
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def encode_frame(entry: Entry) -> bytes:
    """Frame one entry for the log."""
    payload = entry.key_id + entry.signature + entry.record
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True, slots=True)
class WalScan:
    """What a log holds: whole entries, and the torn bytes from the first frame that is not whole.

    ``torn`` is normally a cut-short last frame; a torn frame with more frames after it (a log
    appended to after a failed write, by writers before this rule) leaves them in ``torn`` too:
    they are not accepted into the chain."""

    entries: list[Entry]
    valid_bytes: int
    torn: bytes


def _whole_frame(data: bytes, pos: int) -> int:
    """End of a whole, CRC-valid frame starting at ``pos``, or -1."""
    if len(data) - pos < FRAME.size:
        return -1
    length, crc = FRAME.unpack_from(data, pos)
    end = pos + FRAME.size + length
    if length < _PREFIX or length > MAX_FRAME or end > len(data):
        return -1
    return end if zlib.crc32(memoryview(data)[pos + FRAME.size:end]) == crc else -1


@dataclass(frozen=True, slots=True)
class WalFrames:
    """Where the whole frames of a log lie, nothing copied: ``payloads[i]`` is the (start, end) of
    frame i's payload in ``data``; ``torn`` as in :class:`WalScan`."""

    data: memoryview
    payloads: list[tuple[int, int]]
    valid_bytes: int
    torn: bytes

    def record(self, i: int) -> memoryview:
        """Frame i's record (a view into the log's bytes)."""
        start, end = self.payloads[i]
        return self.data[start + _PREFIX:end]

    def entries(self) -> list[Entry]:
        """Every whole frame as an :class:`Entry` (its bytes copied)."""
        return [Entry(record=bytes(self.data[s + _PREFIX:e]), signature=bytes(self.data[s + HASH_SIZE:s + _PREFIX]),
                      key_id=bytes(self.data[s:s + HASH_SIZE])) for s, e in self.payloads]


def frames(data: bytes) -> WalFrames:
    """Find the frames of log bytes: whole frames up to the first one that is not whole, the rest
    is ``torn``. A complete frame whose CRC fails although a whole frame follows it right where its
    length says is corruption in place (not a torn write), and a log of more than
    :data:`MAX_LOG_FRAMES` frames more than any writer leaves: both raise :class:`FormatError`."""
    view = memoryview(data)
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):  # created but magic not fully written: empty log
            return WalFrames(view, [], len(data), b"")
        raise FormatError("write-ahead log does not start with its magic bytes")
    pos, payloads = len(MAGIC), list[tuple[int, int]]()
    while pos < len(data):
        end = _whole_frame(data, pos)
        if end < 0:
            if len(data) - pos >= FRAME.size:
                length, _ = FRAME.unpack_from(data, pos)
                claimed = pos + FRAME.size + length
                if _PREFIX <= length <= MAX_FRAME and claimed < len(data) and _whole_frame(data, claimed) > 0:
                    raise FormatError(f"write-ahead log frame at byte {pos} is corrupt (CRC mismatch)")
            break
        if len(payloads) == MAX_LOG_FRAMES:
            raise FormatError(f"write-ahead log holds more than {MAX_LOG_FRAMES} frames, more than a writer leaves "
                              f"in it (it rolls the log into a part every 8192 entries)")
        payloads.append((pos + FRAME.size, end))
        pos = end
    return WalFrames(view, payloads, pos, bytes(view[pos:]))


def scan(data: bytes) -> WalScan:
    """Parse log bytes into entries (see :func:`frames` for what is whole, torn or refused)."""
    found = frames(data)
    return WalScan(found.entries(), found.valid_bytes, found.torn)


def count_frames(torn: bytes, key_id: bytes) -> int:
    """How many whole frames signed by ``key_id`` lie inside torn bytes (entries a torn frame
    left outside the chain; for the recovery report)."""
    count, at = 0, torn.find(key_id, FRAME.size)
    while at >= 0:
        end = _whole_frame(torn, at - FRAME.size)
        if end > 0:
            count += 1
            at = torn.find(key_id, end + FRAME.size)
        else:
            at = torn.find(key_id, at + 1)
    return count


def read(path: Path) -> WalScan:
    """Scan the log at ``path`` read-only (an absent log is empty; a FIFO, device or oversize
    file raises :class:`FormatError`)."""
    found = read_frames(path)
    return WalScan(found.entries(), found.valid_bytes, found.torn)


def read_frames(path: Path) -> WalFrames:
    """:func:`frames` of the log at ``path``, read once and whole (at most :data:`MAX_LOG`), read-only."""
    try:
        # a live writer may append while we read: the frames present at open are a consistent prefix
        return frames(read_regular(path, what="write-ahead log", limit=MAX_LOG, appended=True))
    except FileNotFoundError:
        return WalFrames(memoryview(b""), [], 0, b"")


class WalWriter:
    """Appends frames to a log file; the caller decides when to fsync.

    After a write that could not be undone, or a failed fsync, the writer is *broken*: every
    later :meth:`append` raises :class:`StorageError` (the ledger must be reopened to recover)."""

    def __init__(self, path: Path, *, fresh: bool = False) -> None:
        self.path = path
        self.broken: str | None = None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _CLOEXEC | (os.O_EXCL if fresh else 0)
        self._fd = os.open(path, flags, 0o644)
        try:
            self._end = os.fstat(self._fd).st_size
            if self._end < len(MAGIC):  # new, or its magic was cut short: an empty log
                os.ftruncate(self._fd, 0)
                self._end = 0
                self.append(MAGIC)
        except BaseException:
            os.close(self._fd)
            raise
        close_in_forked_children(self)

    def _drop_in_child(self) -> None:
        """In a forked child: close this copy of the descriptor; the child cannot append."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self.broken = f"this process was forked from the one writing {self.path}; only that one appends"
            os.close(fd)

    def append(self, frame: bytes) -> None:
        """Write one frame; returns once the OS has it. On an ``OSError`` nothing of the frame
        remains in the log (or the writer is broken and says so from then on)."""
        if self.broken:
            raise StorageError(self.broken)
        try:
            write_all(self._fd, frame)
        except OSError as exc:
            if getattr(exc, "written", 1):  # some bytes landed (or unknown): cut back to the last whole frame
                try:
                    os.ftruncate(self._fd, self._end)
                except OSError as cut:
                    self.broken = (f"the log {self.path} holds a torn frame that could not be cut back "
                                   f"({cut.strerror or cut}); no more entries can be appended: reopen the "
                                   "ledger (LedgerWriter.open) to recover it")
            raise
        self._end += len(frame)

    def fsync(self) -> None:
        """Force the log to stable storage. A failure breaks the writer: after a failed fsync the
        kernel may have dropped the pages, so what is durable is unknown."""
        if self.broken:
            raise StorageError(self.broken)
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.broken = (f"an fsync of the log {self.path} failed ({exc.strerror or exc}); no more entries "
                           "can be appended: reopen the ledger (LedgerWriter.open) to recover it")
            raise

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def fresh_log(path: Path) -> WalWriter:
    """A new empty log at ``path``.tmp (magic written and fsynced) to be renamed over ``path``;
    a stale temporary file of an interrupted roll is replaced."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        writer = WalWriter(tmp, fresh=True)
    except BaseException:
        unlink_quietly(tmp)
        raise
    try:
        writer.fsync()
    except BaseException:
        writer.close()
        unlink_quietly(tmp)
        raise
    return writer
