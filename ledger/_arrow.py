"""Arrow columns as numpy arrays and Python values, read from their buffers.

pyarrow imports pandas (about 0.2 s of CPU, more than all of verify's own imports) on the first
conversion that consults its pandas shim: ``pa.array`` and ``pa.scalar``, a Python value in a
compute call, ``to_numpy``, ``take``. The verifier reads its columns through these functions
instead (public pyarrow only: ``buffers()``, ``from_buffers``, ``slice``, ``to_pylist``; no
``pyarrow.compute``), so
``ledger verify`` never imports pandas; ``Ledger.to_pandas`` and ``ledger log`` still do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any

import numpy as np
import pyarrow as pa

from ledger.errors import FormatError


def _valid(chunk: pa.Array) -> np.ndarray | None:
    """The validity of each row of ``chunk`` as a bool vector, or None when it holds no null."""
    if not chunk.null_count:
        return None
    bits = np.unpackbits(np.frombuffer(chunk.buffers()[0], np.uint8), bitorder="little")
    return bits[chunk.offset:chunk.offset + len(chunk)].astype(bool)


def _values(array: pa.Array, dtype: str) -> np.ndarray:
    """The value buffer of a fixed-width ``array`` as a numpy vector (a view; nulls read as
    whatever their slots hold)."""
    width = np.dtype(dtype).itemsize
    if not len(array):
        return np.zeros(0, dtype)
    return np.frombuffer(array.buffers()[1], dtype, count=len(array), offset=array.offset * width)


def int64_values(column: pa.ChunkedArray) -> np.ndarray:
    """The values of an int64 column as one int64 vector. A null (which no reader lets into a
    column the format declares non-null) raises :class:`FormatError`."""
    if not pa.types.is_int64(column.type):
        raise TypeError(f"an int64 column was expected, not {column.type}")
    parts = [np.zeros(0, np.int64)]
    for chunk in column.chunks:
        if chunk.null_count:
            raise FormatError("a null in an integer column the format declares non-null")
        if len(chunk):
            parts.append(_values(chunk, "i8"))
    return np.concatenate(parts)


def map_entries(column: pa.ChunkedArray, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries of a ``map<string, float64>`` column (the metrics) whose key is one of ``keys``:
    (row, index of its key in ``keys``, value; NaN for a null value), in order, a row's entries in
    the order the map holds them; a null row has none."""
    if not pa.types.is_map(column.type) or not pa.types.is_float64(column.type.item_type):
        raise TypeError(f"a map<string, float64> column was expected, not {column.type}")
    rows, codes, values, base = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)], 0
    for chunk in column.chunks:
        n = len(chunk)
        if n:
            offsets = _values(chunk.offsets, "i4").astype(np.int64)  # into the keys and items of every row
            spans = np.arange(offsets[0], offsets[-1])
            row = np.searchsorted(offsets, spans, side="right") - 1  # the row each entry belongs to
            code = string_codes(chunk.keys, keys)[spans]
            valid = _valid(chunk)
            mine = (code >= 0) if valid is None else (code >= 0) & valid[row]
            items = chunk.items
            value = _values(items, "f8").astype(np.float64)
            present = _valid(items)
            if present is not None:
                value[~present] = np.nan
            rows.append(base + row[mine])
            codes.append(code[mine])
            values.append(value[spans[mine]])
        base += n
    return np.concatenate(rows), np.concatenate(codes), np.concatenate(values)


def binary_chunks(column: pa.ChunkedArray) -> Iterator[tuple[np.ndarray, memoryview]]:
    """(int64 offsets, data bytes) of each non-empty chunk of a binary or string column, straight
    from the Arrow buffers (nothing copied)."""
    for chunk in column.chunks:
        n = len(chunk)
        if not n:
            continue
        large = pa.types.is_large_binary(chunk.type) or pa.types.is_large_string(chunk.type)
        width = 8 if large else 4
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if large else np.int32, count=n + 1,
                                offset=chunk.offset * width).astype(np.int64)
        yield offsets, memoryview(chunk.buffers()[2] or b"")


def fixed_rows(column: pa.ChunkedArray) -> np.ndarray:
    """(n, width) uint8 view of a fixed_size_binary column."""
    width = column.type.byte_width
    parts = [np.zeros((0, width), np.uint8)]
    for chunk in column.chunks:
        if len(chunk):
            data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
            parts.append(data[chunk.offset * width:(chunk.offset + len(chunk)) * width].reshape(-1, width))
    return np.concatenate(parts)


def string_codes(column: pa.ChunkedArray | pa.Array, labels: Sequence[str]) -> np.ndarray:
    """For each row of a string column (or array), the index in ``labels`` (distinct) of its value;
    -1 for a null or a value not among them (int64 vector). Read from the offsets and bytes
    (``pyarrow.compute`` costs ~30 ms to import, a tenth of verify's start)."""
    if not pa.types.is_string(column.type):
        raise TypeError(f"a string column was expected, not {column.type}")
    wanted = [np.frombuffer(label.encode(), np.uint8) for label in labels]
    parts = [np.zeros(0, np.int64)]
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        codes = np.full(len(chunk), -1, np.int64)
        if len(chunk):
            _, offsets_buffer, data_buffer = chunk.buffers()
            offsets = np.frombuffer(offsets_buffer, "<i4", count=len(chunk) + 1, offset=chunk.offset * 4)
            data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
            starts, lengths = offsets[:-1].astype(np.int64), np.diff(offsets)
            for index, want in reversed(list(enumerate(wanted))):  # a repeated label: its first index
                rows = np.flatnonzero(lengths == len(want))
                if len(rows) == len(chunk) and len(want):  # every row this long: the bytes back to back
                    block = data[offsets[0]:offsets[-1]].reshape(-1, len(want))
                    codes[(block == want).all(axis=1)] = index
                    continue
                for lo in range(0, len(rows), 1 << 16):  # gathered a bounded batch at a time
                    batch = rows[lo:lo + (1 << 16)]
                    same = (data[starts[batch, None] + np.arange(len(want))] == want).all(axis=1)
                    codes[batch[same]] = index
            valid = _valid(chunk)
            if valid is not None:
                codes[~valid] = -1
        parts.append(codes)
    return np.concatenate(parts)


def pylist_at(column: pa.ChunkedArray, rows: Sequence[int]) -> list[Any]:
    """The Python values of ``rows`` of a column, in that order: one slice when they are a run of
    consecutive rows, else row by row (``take`` would build its index array through pandas)."""
    if not len(rows):
        return []
    if len(rows) == 1 or bool((np.diff(np.asarray(rows, np.int64)) == 1).all()):
        values: list[Any] = column.slice(rows[0], len(rows)).to_pylist()
        return values
    return [column[i].as_py() for i in rows]


def typed_array(values: Sequence[Any], type_: pa.DataType) -> pa.Array:
    """Python ``values`` (ints, strs, bytes of the type's width, or lists of (str, float) pairs for
    a ``map<string, float64>``) as an Arrow array of ``type_`` without nulls, built from buffers;
    an int out of int64's range raises ``OverflowError`` (as ``pa.array`` would)."""
    n = len(values)
    if pa.types.is_int64(type_) or pa.types.is_float64(type_):
        data = np.array(values, np.int64 if pa.types.is_int64(type_) else np.float64)
        return pa.Array.from_buffers(type_, n, [None, pa.py_buffer(data)])
    if pa.types.is_fixed_size_binary(type_):
        joined = b"".join(values)
        if len(joined) != n * type_.byte_width or any(len(v) != type_.byte_width for v in values):
            raise ValueError(f"values of {type_.byte_width} bytes were expected")
        return pa.Array.from_buffers(type_, n, [None, pa.py_buffer(joined)])
    if pa.types.is_string(type_):
        raw = [v.encode() for v in values]
        return pa.Array.from_buffers(type_, n, [None, pa.py_buffer(_offsets(raw)), pa.py_buffer(b"".join(raw))])
    if pa.types.is_map(type_):
        pairs = [pair for row in values for pair in row]
        entries = pa.Array.from_buffers(pa.struct([type_.key_field, type_.item_field]), len(pairs), [None], children=[
            typed_array([k for k, _ in pairs], type_.key_type), typed_array([v for _, v in pairs], type_.item_type)])
        return pa.Array.from_buffers(type_, n, [None, pa.py_buffer(_offsets(values))], children=[entries])
    raise TypeError(f"no builder for {type_}")


def _offsets(rows: Sequence[Sized]) -> np.ndarray:
    """int32 offsets of ``rows`` laid end to end (``OverflowError`` past 2 GiB)."""
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    if offsets[-1] >= 1 << 31:
        raise OverflowError("more than 2 GiB in one array")
    return offsets.astype(np.int32)


__all__ = ["binary_chunks", "fixed_rows", "int64_values", "map_entries", "pylist_at", "string_codes", "typed_array"]
