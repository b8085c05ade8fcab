"""Reading a ledger for verification: every record's bytes and recomputed hash, straight from the
Arrow buffers, and the fixed header fields of every record as numpy columns."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ledger import _parts, _record
from ledger._arrow import binary_chunks
from ledger._encoding import decode_body
from ledger._reader import Ledger, Source
from ledger._record import HEADER_LAYOUT, HEADER_OFFSETS, HEADER_SIZE, MAX_RECORD_BYTES, Kind
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


class Bodies:
    """Byte strings lying in buffers — the bodies of records (each record past its header) in the
    Arrow buffers of the record column, or a list's items —: each one's buffer, start and end. A
    body becomes ``bytes`` only when it is asked for by itself; bodies of one length are gathered
    into a matrix at once."""

    def __init__(self, buffers: list[np.ndarray], chunk: np.ndarray, start: np.ndarray, end: np.ndarray) -> None:
        self._buffers, self._chunk, self._start, self._end = buffers, chunk, start, end

    @classmethod
    def of(cls, items: list[bytes]) -> Bodies:
        """The items of a list."""
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        ends = np.cumsum(lengths)
        return cls([np.frombuffer(b"".join(items), np.uint8)], np.zeros(len(items), np.int64), ends - lengths, ends)

    @classmethod
    def of_records(cls, column: pa.ChunkedArray, rows: np.ndarray, skip: int) -> Bodies:
        """Records ``rows`` (positions, ascending) of a binary column past their first ``skip`` bytes."""
        buffers, starts, ends, chunks, first = [], [], [], [], 0
        for offsets, data in binary_chunks(column):
            n = len(offsets) - 1
            lo, hi = np.searchsorted(rows, (first, first + n))  # rows ascending: this chunk's, without a pass
            mine = rows[lo:hi] - first                           # over every row per chunk
            buffers.append(np.frombuffer(data, np.uint8))
            ends.append(offsets[mine + 1])
            starts.append(np.minimum(offsets[mine] + skip, ends[-1]))
            chunks.append(np.full(len(mine), len(buffers) - 1, np.int64))
            first += n
        empty = [np.zeros(0, np.int64)]
        return cls(buffers, *(np.concatenate(empty + part) for part in (chunks, starts, ends)))

    def __len__(self) -> int:
        return len(self._start)

    def __getitem__(self, i: int) -> bytes:
        return self._buffers[int(self._chunk[i])][int(self._start[i]):int(self._end[i])].tobytes()

    def lengths(self) -> np.ndarray:
        """The length of each body (int64)."""
        lengths: np.ndarray = self._end - self._start
        return lengths

    def take(self, idx: np.ndarray) -> Bodies:
        """Bodies ``idx``, in that order."""
        return Bodies(self._buffers, self._chunk[idx], self._start[idx], self._end[idx])

    def matrix(self, idx: np.ndarray) -> np.ndarray:
        """The bodies ``idx`` (all of one length) as the rows of a uint8 matrix."""
        size = int(self._end[idx[0]] - self._start[idx[0]]) if len(idx) else 0
        out = np.empty((len(idx), size), np.uint8)
        chunk, start = self._chunk[idx], self._start[idx]
        order = None if bool((chunk[1:] >= chunk[:-1]).all()) else np.argsort(chunk, kind="stable")
        if order is not None:
            chunk, start = chunk[order], start[order]
        cuts = [0, *(np.flatnonzero(chunk[1:] != chunk[:-1]) + 1).tolist(), len(chunk)]
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):  # each run of one buffer's bodies: rows of its
            if hi > lo:                                       # sliding windows (a view), by start
                rows = np.lib.stride_tricks.sliding_window_view(self._buffers[int(chunk[lo])], size)[start[lo:hi]]
                out[lo:hi] = rows
        if order is not None:
            out[order] = out.copy()
        return out


@dataclass(slots=True)
class Loaded:
    """The ledger's rows, with recomputed hashes (shared by the checks)."""

    table: pa.Table
    records: Records
    hashes: list[bytes]
    errors: list[tuple[str, str]]  # (source, reason) for unreadable parts
    genesis: dict[str, Any] | None
    genesis_error: str | None
    # (table, header matrix, lengths) of the last :meth:`headers` call: several checks read them
    _headers: tuple[pa.Table, np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False,
                                                                    compare=False)
    _joined: tuple[list[bytes], int, bytes] | None = field(default=None, init=False, repr=False, compare=False)

    def joined_hashes(self) -> bytes:
        """``b"".join(self.hashes)``, joined once per hash list (the chain check and the first broken
        link read it)."""
        if self._joined is None or self._joined[0] is not self.hashes or self._joined[1] != len(self.hashes):
            self._joined = (self.hashes, len(self.hashes), b"".join(self.hashes))
        return self._joined[2]

    def headers(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`header_matrix` of the table's records, computed once per table (read-only arrays)."""
        if self._headers is None or self._headers[0] is not self.table:
            matrix, lengths = header_matrix(self.table["record"])
            matrix.flags.writeable = lengths.flags.writeable = False
            self._headers = (self.table, matrix, lengths)
        return self._headers[1], self._headers[2]


def _leaf_hashes(column: pa.ChunkedArray) -> list[bytes]:
    """RFC 9162 leaf hashes of every record, straight from the Arrow buffers (no record is copied).
    A record over the 64 MiB a record may have (docs/FORMAT.md §2), seen from the offsets before
    anything is hashed, raises :class:`FormatError`."""
    prefix, out = hashlib.sha256(b"\x00"), []
    chunks = list(binary_chunks(column))
    for offsets, _ in chunks:
        sizes = np.diff(offsets)
        if len(sizes) and int(sizes.max()) > MAX_RECORD_BYTES:
            raise FormatError(f"holds a record of {int(sizes.max())} bytes, more than the "
                              f"{MAX_RECORD_BYTES >> 20} MiB a record may have")
    for offsets, data in chunks:
        bounds = offsets.tolist()
        for i in range(len(bounds) - 1):
            digest = prefix.copy()
            digest.update(data[bounds[i]:bounds[i + 1]])
            out.append(digest.digest())
    return out


def _sources(ledger: Ledger) -> Iterator[Source]:
    """The ledger's sources as the reader yields them; when the reader itself fails on hostile
    storage (an error other than FormatError, e.g. ``wal.log`` is a directory), the parts it had
    not reached are read one by one and the failure becomes an unreadable source."""
    seen: set[str] = set()
    try:
        for source in ledger.iter_sources():
            seen.add(source.name)
            yield source
        return
    except FormatError as exc:
        failure = str(exc)
    except (OSError, ValueError, TypeError, RecursionError, MemoryError, pa.ArrowException) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    for path in _parts.list_parts(ledger.layout.parts):
        name = f"parts/{path.name}"
        if name in seen:
            continue
        try:
            yield Source(name, _parts.read_part(path))
        except FormatError as exc:
            yield Source(name, None, str(exc))
        except (OSError, ValueError, TypeError, pa.ArrowException) as exc:
            yield Source(name, None, f"unreadable ({type(exc).__name__}: {exc})")
    yield Source("wal.log", None, f"the log could not be read ({failure})")


def load(ledger: Ledger) -> Loaded:
    """Read every readable source and recompute every entry hash (hashing one part while the
    reader decompresses the next)."""
    tables, errors, hashes = [], [], []
    for source in _sources(ledger):
        if source.table is None:
            errors.append((source.name, source.error or "unreadable"))
            continue
        if not source.table.num_rows and source.name.startswith("parts/"):
            errors.append((source.name, "holds no entries (the writer never writes an empty part)"))
            continue
        try:
            source_hashes = _leaf_hashes(source.table["record"])
        except FormatError as exc:
            errors.append((source.name, str(exc)))
            continue
        except MemoryError:  # under a memory limit: the source cannot be held (a failed check, not a crash)
            errors.append((source.name, "unreadable: it does not fit in memory"))
            continue
        tables.append(source.table)
        hashes.extend(source_hashes)
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
        except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:  # a decoder gap
            genesis_error = f"record body could not be decoded ({type(exc).__name__}: {exc})"
    else:
        genesis_error = "the ledger holds no entries"
    return Loaded(table, records, hashes, errors, genesis, genesis_error)


def header_matrix(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 92) uint8 header bytes of every record (zeros where a record is too short), and the
    record lengths; read straight from Arrow's buffers, chunk by chunk, without copying records."""
    rows, lengths = [np.zeros((0, HEADER_SIZE), np.uint8)], [np.zeros(0, np.int64)]
    for offsets, raw in binary_chunks(column):
        data = np.frombuffer(raw, dtype=np.uint8)
        size = np.diff(offsets)
        ok = size >= HEADER_SIZE
        block = np.zeros((len(size), HEADER_SIZE), np.uint8)
        if ok.any():  # each record's first bytes: rows of the buffer's sliding windows (a view), by start
            block[ok] = np.lib.stride_tricks.sliding_window_view(data, HEADER_SIZE)[offsets[:-1][ok]]
        rows.append(block)
        lengths.append(size)
    return np.concatenate(rows), np.concatenate(lengths)


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


def rows_differ(rows: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per row of an (n, w) uint8 matrix, whether it differs from the same row of ``other`` (n, w),
    or from ``other`` itself when it is one row; 8 bytes at a time when w is a multiple of 8."""
    rows, other = np.ascontiguousarray(rows), np.ascontiguousarray(other)
    if rows.shape[-1] != other.shape[-1]:
        raise ValueError(f"rows of {rows.shape[-1]} bytes compared with rows of {other.shape[-1]}")
    if rows.shape[-1] % 8 == 0:
        rows, other = rows.view(np.uint64), other.view(np.uint64)
    differ: np.ndarray = (rows != other).any(axis=-1)
    return differ


def links_broken(prev: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Per entry, whether its prev_hash (rows of ``prev``) is not the previous entry's hash (zeros
    for the first)."""
    broken = np.empty(len(prev), bool)
    if len(prev):
        broken[0] = rows_differ(prev[:1], np.zeros((1, prev.shape[1]), np.uint8))[0]
        broken[1:] = rows_differ(prev[1:], hashes[:-1])
    return broken


def first_break(loaded: Loaded) -> int:
    """Position of the first entry whose header or link is broken (too short, an unknown version,
    kind or reserved byte, seq out of place, prev_hash not the previous hash), or the number of
    entries when none is: from there on the chain has failed, and decoding the bodies that follow
    cannot change the verdict."""
    n = len(loaded.records)
    if n == 0:
        return 0
    headers, lengths = loaded.headers()
    hashes = np.frombuffer(loaded.joined_hashes(), dtype=np.uint8).reshape(n, 32)
    broken = (lengths < HEADER_SIZE) | (header_field(headers, "version") != _record.FORMAT_VERSION) \
        | (header_field(headers, "reserved") != 0) | (header_field(headers, "kind") > max(Kind)) \
        | (header_field(headers, "seq") != np.arange(n)) | links_broken(header_field(headers, "prev_hash"), hashes)
    bad = np.flatnonzero(broken)
    return int(bad[0]) if len(bad) else n
