"""Many step bodies of one shape checked and read at once, from their bytes.

A recorder writes step bodies that differ only in their numbers: the same keys, the same typed-array
heads, the same metric names, each float in the same width. A :class:`Template` is one body that
passed the full check (:func:`ledger._encoding.decode_body` and ``StepBody.from_body``); another
body of the same length *matches* it when every byte outside the template's payloads (typed-array
contents, byte-string contents, floats) is the template's and each float is in the shortest exact
width the deterministic encoding demands (docs/FORMAT.md §3). Such a body is canonical CBOR of the
same structure, so it decodes, and passes ``StepBody.from_body``, exactly as the template does, with
its own payloads: no field ``from_body`` validates lies in a payload except the arrays, which it
accepts at any value. Bodies that match no template are read one by one, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ledger._canonical import TYPED_ARRAY_TAGS

ARRAYS = ("norms", "lrs", "grad_norms", "sketch")  # the StepBody arrays read from a template's payloads
_DTYPES = {tag: np.dtype(name).newbyteorder("<") for name, tag in TYPED_ARRAY_TAGS.items()}


@dataclass(frozen=True)
class Template:
    """Where one body's payloads lie: everything else must be equal byte for byte."""

    length: int
    fixed: np.ndarray  # positions of the bytes every matching body shares
    expect: np.ndarray  # those bytes
    floats: tuple[tuple[int, int], ...]  # (position, width) of each float's bytes
    arrays: dict[str, tuple[int, int, np.dtype[Any]]]  # field -> (position, bytes, dtype)

    def matches(self, rows: np.ndarray) -> np.ndarray:
        """Which rows of an (n, length) uint8 matrix of bodies are canonical bodies of this shape."""
        ok: np.ndarray = np.all(rows[:, self.fixed] == self.expect, axis=1)
        for pos, width in self.floats:
            ok &= _shortest(rows[:, pos:pos + width], width)
        return ok

    def array(self, rows: np.ndarray, name: str) -> np.ndarray:
        """The float64 values of array ``name`` in each row (n × items)."""
        pos, size, dtype = self.arrays[name]
        raw = np.ascontiguousarray(rows[:, pos:pos + size])
        values: np.ndarray = raw.view(dtype).reshape(len(rows), size // dtype.itemsize).astype(np.float64)
        return values


def _shortest(raw: np.ndarray, width: int) -> np.ndarray:
    """Whether each big-endian float is in the deterministic encoding's width: not narrower exactly
    (so not ±inf, which is half-width), no NaN but the half-width f97e00."""
    raw = np.ascontiguousarray(raw)
    if width == 2:
        bits = raw.view(">u2").ravel()
        half: np.ndarray = ((bits & 0x7C00) != 0x7C00) | ((bits & 0x3FF) == 0) | (bits == 0x7E00)
        return half
    value = raw.view(">f8" if width == 8 else ">f4").ravel()
    with np.errstate(over="ignore", invalid="ignore"):
        narrower = value.astype(np.float32 if width == 8 else np.float16).astype(value.dtype)
    wider: np.ndarray = (value == value) & (narrower != value)
    return wider


def template(data: bytes) -> Template | None:
    """The template of a body that passed the full check, or None when its shape is not one this
    reader takes (a float or typed array outside ``metrics`` other than the :data:`ARRAYS`, an
    array field that is not a typed array, or ``hyper``)."""
    fixed = np.ones(len(data), dtype=bool)
    floats: list[tuple[int, int]] = []
    arrays: dict[str, tuple[int, int, np.dtype[Any]]] = {}
    keys: list[str] = []
    pos, count = _head(data, 0)
    for _ in range(count):
        start, size = _head(data, pos)
        key = data[start:start + size].decode()
        keys.append(key)
        pos = _item(data, start + size, key, 0, fixed, floats, arrays)
        if pos < 0:
            return None
    if "hyper" in keys or any(name in keys and name not in arrays for name in ARRAYS):
        return None
    where = np.flatnonzero(fixed)
    return Template(len(data), where, np.frombuffer(data, dtype=np.uint8)[where].copy(), tuple(floats), arrays)


def _head(data: bytes, pos: int) -> tuple[int, int]:
    """(position after the head, its argument) of a definite-length head at ``pos``."""
    info = data[pos] & 31
    if info < 24:
        return pos + 1, info
    size = 1 << (info - 24)
    return pos + 1 + size, int.from_bytes(data[pos + 1:pos + 1 + size], "big")


def _item(data: bytes, pos: int, key: str, depth: int, fixed: np.ndarray, floats: list[tuple[int, int]],
          arrays: dict[str, tuple[int, int, np.dtype[Any]]]) -> int:
    """Mark the payloads of the item at ``pos`` (``depth`` levels below top-level ``key``); its end,
    or −1 when the shape is not one this reader takes."""
    major, info = data[pos] >> 5, data[pos] & 31
    if major == 7 and info >= 25:
        if key != "metrics":
            return -1
        width = 1 << (info - 24)
        fixed[pos + 1:pos + 1 + width] = False
        floats.append((pos + 1, width))
        return pos + 1 + width
    after, arg = _head(data, pos)
    if major in (0, 1, 3, 7):
        return after + arg if major == 3 else after
    if major == 2:
        fixed[after:after + arg] = False
        return after + arg
    if major in (4, 5):
        for _ in range(arg * (major - 3)):
            after = _item(data, after, key, depth + 1, fixed, floats, arrays)
            if after < 0:
                return -1
        return after
    start, length = _head(data, after)  # a tag over a byte string (the full check made sure)
    if arg in _DTYPES:
        if key in ARRAYS and depth == 0:
            arrays[key] = (start, length, _DTYPES[arg])
        elif key != "metrics":
            return -1
        fixed[start:start + length] = False
    return start + length
