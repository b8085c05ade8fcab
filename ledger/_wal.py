"""The write-ahead log: the open tail of a ledger, one framed entry after another.

File ``wal.log`` = 8-byte magic ``TLWAL1\\n\\0`` then frames. Frame = u32 BE payload length ‖
u32 BE CRC-32 (zlib) of the payload ‖ payload, payload = key id (32) ‖ signature (64) ‖ record.
Appends go through one ``os.write`` on an ``O_APPEND`` descriptor, so once ``append`` returns the
frame is in the OS page cache and survives the process being killed.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from ledger._entry import Entry
from ledger._record import HASH_SIZE, SIGNATURE_SIZE
from ledger.errors import FormatError

MAGIC = b"TLWAL1\n\x00"
FRAME = struct.Struct(">II")
_PREFIX = HASH_SIZE + SIGNATURE_SIZE
MAX_FRAME = 1 << 30


def encode_frame(entry: Entry) -> bytes:
    """Frame one entry for the log."""
    payload = entry.key_id + entry.signature + entry.record
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True, slots=True)
class WalScan:
    """What a log holds: whole entries, and the torn bytes after the last whole frame."""

    entries: list[Entry]
    valid_bytes: int
    torn: bytes


def scan(data: bytes) -> WalScan:
    """Parse log bytes. A frame cut short at the end is reported as ``torn``; a complete frame
    whose CRC fails, when more frames follow, is corruption and raises :class:`FormatError`."""
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):  # created but magic not fully written: empty log
            return WalScan([], len(data), b"")
        raise FormatError("write-ahead log does not start with its magic bytes")
    pos, entries = len(MAGIC), []
    while pos < len(data):
        if len(data) - pos < FRAME.size:
            break
        length, crc = FRAME.unpack_from(data, pos)
        end = pos + FRAME.size + length
        if length < _PREFIX or length > MAX_FRAME or end > len(data):
            break
        payload = data[pos + FRAME.size:end]
        if zlib.crc32(payload) != crc:
            if end < len(data):
                raise FormatError(f"write-ahead log frame at byte {pos} is corrupt (CRC mismatch)")
            break
        entries.append(Entry(record=payload[_PREFIX:], signature=payload[HASH_SIZE:_PREFIX],
                             key_id=payload[:HASH_SIZE]))
        pos = end
    return WalScan(entries, pos, data[pos:])


def read(path: Path) -> WalScan:
    """Scan the log at ``path`` read-only (an absent log is empty)."""
    try:
        return scan(path.read_bytes())
    except FileNotFoundError:
        return WalScan([], 0, b"")


class WalWriter:
    """Appends frames to a log file; the caller decides when to fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size == 0:
            os.write(self._fd, MAGIC)

    def append(self, frame: bytes) -> None:
        """Write one frame; returns once the OS has it."""
        view = memoryview(frame)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def fsync(self) -> None:
        """Force the log to stable storage."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
