"""What a Parquet part may cost to read, decided before Arrow decodes a value of it.

A crafted part can make Arrow allocate far more than its size: a tiny file whose footer claims a
million rows, a page whose header claims a hundred million run-length-encoded map entries (Arrow
does not check a page's value count against the footer's), or a one-megabyte dictionary value
referenced by every row. So before reading, :func:`check_part` walks the footer and then every
page header of every column chunk (Thrift compact protocol, the bytes Arrow itself will read) and
refuses the part unless

- rows ≤ file size / 96: each row carries a 64-byte random signature and a 32-byte hash, which no
  codec compresses (docs/FORMAT.md §6.4), and every row group's columns hold exactly its rows;
- the decompressed page bytes sum to at most :func:`budget` (64 MiB + 32 × the file size, and
  never more than 2 GiB), and the parts of one ledger together to at most what its
  :class:`LedgerBudget` has left (64 MiB once + 32 × the bytes of all its parts): many small parts
  cannot each claim the 64 MiB floor;
- the map entries of ``metrics`` are at most one per row plus one per 4 decompressed bytes of the
  ``record`` column (a metric takes at least 4 bytes of the signed body);
- a dictionary-encoded text or binary column could not expand past the budget (value count ×
  dictionary size); when it could, the column is read as an Arrow dictionary and its expanded size
  is measured before it is decoded (:func:`expand_dictionaries`).
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ledger.errors import FormatError

MiB, GiB = 1 << 20, 1 << 30
ROW_FLOOR = 96  # incompressible bytes per row: signature (64) + entry hash (32)
BUDGET_FLOOR = 64 * MiB  # one record of the largest size a record may have (docs/FORMAT.md §2)
BUDGET_RATIO = 32
BUDGET_CAP = 2 * GiB
MAX_PART_BYTES = 1 * GiB
_BINARY = frozenset({"BYTE_ARRAY"})
_FLAT = ("seq", "kind", "step", "time_ns", "run_id", "key_id", "hash", "record", "signature")
_METRICS = ("metrics.key_value.key", "metrics.key_value.value")


def budget(file_size: int) -> int:
    """The most decoded bytes a part of ``file_size`` bytes may need."""
    return min(BUDGET_CAP, BUDGET_FLOOR + BUDGET_RATIO * file_size)


class LedgerBudget:
    """The decoded bytes all the parts of one ledger may take together: :data:`BUDGET_FLOOR` once
    plus :data:`BUDGET_RATIO` × the bytes of all its parts on disk (docs/FORMAT.md §6.4).

    Parts take their share in order, each in its :meth:`turn` (part ``i`` after part ``i - 1``,
    whatever thread reads it), so which part a crafted ledger gets refused does not depend on timing.
    A clean ledger of any number of parts fits: each of its parts decodes to a few times its size."""

    def __init__(self, disk_bytes: int) -> None:
        self.left = BUDGET_FLOOR + BUDGET_RATIO * max(disk_bytes, 0)
        self._next = 0
        self._ready = threading.Condition()

    @contextmanager
    def turn(self, index: int) -> Iterator[LedgerBudget]:
        """Wait until the parts before ``index`` have taken their share; the turn passes on when
        the block ends (also when it raises). Callers start turns in index order."""
        with self._ready:
            self._ready.wait_for(lambda: self._next >= index)
        try:
            yield self
        finally:
            with self._ready:
                self._next = max(self._next, index + 1)
                self._ready.notify_all()

    def take(self, amount: int) -> None:
        """Charge ``amount`` decoded bytes (within a turn, after :func:`check_part` allowed them)."""
        self.left -= amount


# ----------------------------------------------------------------------------- Thrift compact protocol
class _Thrift:
    """A reader of the Thrift compact protocol over a buffer, bounded by ``end``."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: Any, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise FormatError("page header runs past its column chunk")
        value: int = self.buf[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise FormatError("page header holds an overlong integer")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def skip(self, kind: int, depth: int) -> None:
        if depth > 16:
            raise FormatError("page header nested too deeply")
        if kind in (1, 2):  # bool in a field header
            return
        if kind == 3:
            self.byte()
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.advance(8)
        elif kind == 8:
            self.advance(self.varint())
        elif kind in (9, 10):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            self._elements(size, elem, depth)
        elif kind == 11:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(min(size, self.end - self.pos + 1)):
                    self.skip_element(types >> 4, depth + 1)
                    self.skip_element(types & 0x0F, depth + 1)
        elif kind == 12:
            self.struct(depth + 1)
        else:
            raise FormatError(f"page header holds an unknown Thrift type {kind}")

    def _elements(self, size: int, elem: int, depth: int) -> None:
        if size > self.end - self.pos:  # every element takes at least one byte
            raise FormatError("page header list is longer than its bytes")
        for _ in range(size):
            self.skip_element(elem, depth + 1)

    def skip_element(self, kind: int, depth: int) -> None:
        if kind in (1, 2):  # bool as a list element: one byte
            self.byte()
        else:
            self.skip(kind, depth)

    def advance(self, n: int) -> None:
        if n < 0 or self.pos + n > self.end:
            raise FormatError("page header runs past its column chunk")
        self.pos += n

    def fields(self, depth: int) -> Any:
        """Yield (field id, type) for each field of a struct; the caller reads or skips the value."""
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return
            delta, kind = head >> 4, head & 0x0F
            fid = last + delta if delta else self.zigzag()
            last = fid
            yield fid, kind

    def struct(self, depth: int) -> dict[int, int]:
        """Skip a struct, keeping its integer fields (by id)."""
        if depth > 16:
            raise FormatError("page header nested too deeply")
        ints: dict[int, int] = {}
        for fid, kind in self.fields(depth):
            if kind in (3, 4, 5, 6):
                ints[fid] = self.zigzag() if kind != 3 else self.byte()
            else:
                self.skip(kind, depth)
        return ints


@dataclass(slots=True)
class _Page:
    kind: int
    uncompressed: int
    compressed: int
    values: int


def _page_header(reader: _Thrift) -> _Page:
    kind = uncompressed = compressed = -1
    values = 0
    for fid, ftype in reader.fields(0):
        if fid in (1, 2, 3) and ftype == 5:
            value = reader.zigzag()
            if fid == 1:
                kind = value
            elif fid == 2:
                uncompressed = value
            else:
                compressed = value
        elif fid in (5, 7, 8) and ftype == 12:
            values = reader.struct(1).get(1, -1)
        else:
            reader.skip(ftype, 0)
    if kind < 0 or uncompressed < 0 or compressed < 0 or values < 0:
        raise FormatError("a page header lacks its type, sizes or value count")
    return _Page(kind, uncompressed, compressed, values)


# ----------------------------------------------------------------------------- the part as a whole
@dataclass(slots=True)
class PartPlan:
    """What the checks found: the columns to read as dictionaries, the decoded-size budget, and
    the most the part may decode to (its share of the ledger's budget)."""

    budget: int
    dictionary_columns: list[str] = field(default_factory=list)
    cost: int = 0


def check_part(handle: Any, metadata: Any, file_size: int, name: str, allowance: int | None = None) -> PartPlan:
    """Refuse a part whose footer or page headers claim more than the format allows (see the
    module docstring), or more than ``allowance`` (what the ledger's budget has left); returns how
    to read it."""
    limit = budget(file_size) if allowance is None else max(0, min(budget(file_size), allowance))
    rows = metadata.num_rows
    if rows < 0 or rows * ROW_FLOOR > file_size:
        raise FormatError(f"part {name} claims {rows} rows in {file_size} bytes; each row takes at least "
                          f"{ROW_FLOOR} incompressible bytes")
    if metadata.num_row_groups > max(rows, 1):
        raise FormatError(f"part {name} has {metadata.num_row_groups} row groups for {rows} rows")
    if metadata.num_columns != len(_FLAT) + len(_METRICS):
        raise FormatError(f"part {name} does not have the ledger schema ({metadata.num_columns} columns)")
    total = 0
    dict_bound: dict[str, int] = {}
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if file_size else _no_map() as buf:
        counted = 0
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            group_rows = group.num_rows
            counted += group_rows
            if group_rows < 0 or counted > rows:
                raise FormatError(f"part {name}: row group {g} claims more rows than the file")
            values: dict[str, int] = {}
            record_bytes = 0
            for c in range(group.num_columns):
                column = group.column(c)
                path = column.path_in_schema
                pages = _walk(buf, column, file_size, name)
                data = [p for p in pages if p.kind in (0, 3)]
                dicts = [p for p in pages if p.kind == 2]
                if len(dicts) > 1:
                    raise FormatError(f"part {name}: column {path} has more than one dictionary page")
                size = sum(p.uncompressed for p in pages)
                total += size
                if total > limit:
                    raise FormatError(f"part {name} decompresses to more than {limit} bytes "
                                      + (f"(a {file_size}-byte part may hold at most that)" if allowance is None
                                         or limit == budget(file_size) else
                                         "(what is left of the ledger's budget: 64 MiB + 32 × the bytes of its "
                                         "parts, for all of them together)"))
                values[path] = sum(p.values for p in data)
                if path == "record":
                    record_bytes += size
                if dicts and column.physical_type in _BINARY:
                    dict_bound[path] = dict_bound.get(path, 0) + values[path] * dicts[0].uncompressed
            for path in _FLAT:
                if values.get(path, group_rows) > group_rows:
                    raise FormatError(f"part {name}: column {path} of row group {g} holds {values[path]} values "
                                      f"for {group_rows} rows")
            entries = group_rows + record_bytes // 4
            for path in _METRICS:
                if values.get(path, 0) > entries:
                    raise FormatError(f"part {name}: row group {g} claims {values[path]} metric entries, more than "
                                      "its records can hold")
        if counted != rows:
            raise FormatError(f"part {name}: its row groups hold {counted} rows, its footer says {rows}")
    # Dictionary columns Arrow may expand as it decodes, while they fit; the rest are read as
    # dictionaries and measured first (a part with any such column is charged its whole limit).
    expanded, measured = total, []
    for path, bound in dict_bound.items():
        if expanded + bound <= limit:
            expanded += bound
        else:
            measured.append(path)
    return PartPlan(limit, measured, limit if measured else expanded)


def _walk(buf: Any, column: Any, file_size: int, name: str) -> list[_Page]:
    start = column.data_page_offset
    dict_offset = column.dictionary_page_offset
    if column.has_dictionary_page and dict_offset is not None and 0 < dict_offset < start:
        start = dict_offset
    length = column.total_compressed_size
    if start is None or length is None or start < 0 or length < 0 or start + length > file_size:
        raise FormatError(f"part {name}: column {column.path_in_schema} lies outside the file")
    end, pos, pages = start + length, start, []
    while pos < end:
        reader = _Thrift(buf, pos, end)
        page = _page_header(reader)
        pos = reader.pos + page.compressed
        if pos > end:
            raise FormatError(f"part {name}: a page of column {column.path_in_schema} runs past its chunk")
        pages.append(page)
    return pages


class _no_map:  # noqa: N801 - a context manager standing in for an empty mapping
    def __enter__(self) -> bytes:
        return b""

    def __exit__(self, *exc: object) -> None:
        return None


def expand_dictionaries(table: pa.Table, columns: list[str], limit: int, name: str) -> pa.Table:
    """Decode the dictionary columns read as such, once their expanded size is known to fit ``limit``."""
    if not columns:
        return table
    spent = table.nbytes
    for column in columns:
        top = column.split(".")[0]
        chunked = table[top]
        arrays = []
        for chunk in chunked.chunks:
            target = chunk.values.field("key") if top == "metrics" else chunk
            import pyarrow.compute as pc  # here only: ~30 ms to import, and most parts have no such column

            lengths = pc.binary_length(target.dictionary)
            size = pc.sum(pc.take(lengths, target.indices)).as_py() or 0
            spent += size
            if spent > limit:
                raise FormatError(f"part {name}: column {column} expands to more than {limit} bytes")
            arrays.append(chunk)
        plain = pa.map_(pa.string(), pa.float64()) if top == "metrics" else \
            chunked.type.value_type
        index = table.schema.get_field_index(top)
        table = table.set_column(index, table.schema.field(index).with_type(plain),
                                 pa.chunked_array([a.cast(plain) for a in arrays], plain))
    return table


__all__ = ["MAX_PART_BYTES", "LedgerBudget", "PartPlan", "budget", "check_part", "expand_dictionaries"]
