"""Reading a ledger for verification: every record's bytes and recomputed hash, straight from the
Arrow buffers, and the fixed header fields of every record as numpy columns."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ledger import _record
from ledger._encoding import decode_body
from ledger._reader import Ledger
from ledger._record import HEADER_LAYOUT, HEADER_OFFSETS, HEADER_SIZE, Kind
from ledger.errors import FormatError


class Records:
    """The record bytes of every entry, read from Arrow buffers on demand; ``materialize`` turns
    them into a list once (full verification), sampled checks take only what they need."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self._chunks = [c for c in column.chunks if len(c)]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
        self._list: list[bytes] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> bytes:
        if self._list is not None:
            return self._list[index]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        value: bytes = self._chunks[chunk][index - int(self._starts[chunk])].as_py()
        return value

    def materialize(self) -> list[bytes]:
        """All records as a list of bytes (kept)."""
        if self._list is None:
            self._list = [r for c in self._chunks for r in c.to_pylist()]
        return self._list


@dataclass(slots=True)
class Loaded:
    """The ledger's rows, with recomputed hashes (shared by the checks)."""

    table: pa.Table
    records: Records
    hashes: list[bytes]
    errors: list[tuple[str, str]]  # (source, reason) for unreadable parts
    genesis: dict[str, Any] | None
    genesis_error: str | None


def binary_chunks(column: pa.ChunkedArray) -> Iterator[tuple[np.ndarray, memoryview]]:
    """(int64 offsets, data bytes) of each non-empty chunk of a binary column, straight from the
    Arrow buffers (nothing copied)."""
    for chunk in column.chunks:
        n = len(chunk)
        if not n:
            continue
        width = 8 if pa.types.is_large_binary(chunk.type) else 4
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if width == 8 else np.int32, count=n + 1,
                                offset=chunk.offset * width).astype(np.int64)
        yield offsets, memoryview(chunk.buffers()[2] or b"")


def _leaf_hashes(column: pa.ChunkedArray) -> list[bytes]:
    """RFC 9162 leaf hashes of every record, straight from the Arrow buffers (no bytes objects
    are kept per record)."""
    sha, out = hashlib.sha256, []
    for offsets, data in binary_chunks(column):
        bounds = offsets.tolist()
        out.extend([sha(b"\x00" + data[bounds[i]:bounds[i + 1]]).digest() for i in range(len(bounds) - 1)])
    return out


def load(ledger: Ledger) -> Loaded:
    """Read every readable source and recompute every entry hash (hashing one part while the
    reader decompresses the next)."""
    tables, errors, hashes = [], [], []
    for source in ledger.iter_sources():
        if source.table is None:
            errors.append((source.name, source.error or "unreadable"))
            continue
        tables.append(source.table)
        hashes.extend(_leaf_hashes(source.table["record"]))
    if tables:
        table = pa.concat_tables(tables)
    else:
        from ledger._parts import SCHEMA

        table = SCHEMA.empty_table()
    records = Records(table["record"])
    genesis, genesis_error = None, None
    if len(records):
        try:
            header = _record.decode_header(records[0])
            if header.kind is not Kind.GENESIS:
                raise FormatError("first entry is not a genesis")
            genesis = decode_body(records[0][HEADER_SIZE:])
        except FormatError as exc:
            genesis_error = str(exc)
    else:
        genesis_error = "the ledger holds no entries"
    return Loaded(table, records, hashes, errors, genesis, genesis_error)


def header_matrix(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 92) uint8 header bytes of every record (zeros where a record is too short), and the
    record lengths; read straight from Arrow's buffers, chunk by chunk, without copying records."""
    rows, lengths = [np.zeros((0, HEADER_SIZE), np.uint8)], [np.zeros(0, np.int64)]
    window = np.arange(HEADER_SIZE)
    for offsets, raw in binary_chunks(column):
        data = np.frombuffer(raw, dtype=np.uint8)
        size = np.diff(offsets)
        ok = size >= HEADER_SIZE
        block = np.zeros((len(size), HEADER_SIZE), np.uint8)
        block[ok] = data[offsets[:-1][ok, None] + window]
        rows.append(block)
        lengths.append(size)
    return np.concatenate(rows), np.concatenate(lengths)


def fixed_rows(column: pa.ChunkedArray) -> np.ndarray:
    """(n, width) uint8 view of a fixed_size_binary column."""
    width = column.type.byte_width
    parts = [np.zeros((0, width), np.uint8)]
    for chunk in column.chunks:
        if len(chunk):
            data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
            parts.append(data[chunk.offset * width:(chunk.offset + len(chunk)) * width].reshape(-1, width))
    return np.concatenate(parts)


_NUMPY_CODES = {"H": ">u2", "B": "u1", "Q": ">u8", "q": ">i8"}


def header_field(headers: np.ndarray, name: str) -> np.ndarray:
    """One header field of every row of an (n, 92) header matrix: integers as an int64 vector,
    byte strings as an (n, size) uint8 matrix (offsets from ``ledger._record.HEADER_LAYOUT``)."""
    offset, size = HEADER_OFFSETS[name]
    block = headers[:, offset:offset + size]
    code = dict(HEADER_LAYOUT)[name]
    if code not in _NUMPY_CODES:
        return block
    return np.ascontiguousarray(block).view(_NUMPY_CODES[code]).ravel().astype(np.int64)
