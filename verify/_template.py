"""Many step bodies of one shape checked and read at once, from their bytes.

A recorder writes step bodies that differ only in their numbers: the same keys, the same typed-array
heads, the same metric names, each float in the same width. A :class:`Template` is one body that
passed the full check (:func:`ledger._encoding.decode_body` and ``StepBody.from_body``); another
body of the same length *matches* it when every byte outside the template's payloads (typed-array
contents, byte-string contents, floats) is the template's and each float is in the shortest exact
width the deterministic encoding demands (docs/FORMAT.md §3). Such a body is canonical CBOR of the
same structure, so it decodes, and passes ``StepBody.from_body``, exactly as the template does, with
its own payloads: no field ``from_body`` validates lies in a payload except the arrays, which it
accepts at any value. Bodies that match no template are read one by one, as before. A template also
says where each metric's float lies, so the chain check compares the metrics column with the bodies
a template accepted without decoding them (:class:`Accepted`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ledger._canonical import TYPED_ARRAY_TAGS, payloads
from ledger._encoding import decode_body
from ledger._schema import StepBody

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
    # the names of the body's metrics in its order and where each one's float lies; None when a metric
    # is not a float (such bodies are compared with the metrics column one by one)
    metrics: tuple[tuple[str, ...], tuple[tuple[int, int], ...]] | None = None

    def matches(self, rows: np.ndarray) -> np.ndarray:
        """Which rows of an (n, length) uint8 matrix of bodies are canonical bodies of this shape."""
        # the fixed bytes compared 8 at a time: rows, template and mask padded to whole 64-bit words,
        # a quarter MiB of rows at a time (its copies stay in the cache: twice as fast at 10^5 bodies)
        width = -(-self.length // 8) * 8
        expect, mask = np.zeros(width, np.uint8), np.zeros(width, np.uint8)
        expect[self.fixed], mask[self.fixed] = self.expect, 0xFF
        expect_words, mask_words = expect.view(np.uint64), mask.view(np.uint64)
        ok = np.empty(len(rows), bool)
        block = max(1, (1 << 18) // width)
        padded = np.zeros((min(block, len(rows)), width), np.uint8)
        for lo in range(0, len(rows), block):
            part = rows[lo:lo + block]
            words = padded[:len(part)]
            words[:, :self.length] = part
            ok[lo:lo + len(part)] = ~((words.view(np.uint64) ^ expect_words) & mask_words).any(axis=1)
            for pos, size in self.floats:
                ok[lo:lo + len(part)] &= _shortest(part[:, pos:pos + size], size)
        return ok

    def array(self, rows: np.ndarray, name: str) -> np.ndarray:
        """The float64 values of array ``name`` in each row (n × items)."""
        pos, size, dtype = self.arrays[name]
        raw = np.ascontiguousarray(rows[:, pos:pos + size])
        values: np.ndarray = raw.view(dtype).reshape(len(rows), size // dtype.itemsize).astype(np.float64)
        return values

    def metric_values(self, rows: np.ndarray) -> np.ndarray:
        """The float64 value of each metric (rows × names, in :attr:`metrics`' order) of matching rows."""
        assert self.metrics is not None
        out = np.empty((len(rows), len(self.metrics[1])))
        for j, (pos, width) in enumerate(self.metrics[1]):
            out[:, j] = np.ascontiguousarray(rows[:, pos:pos + width]).view(_FLOATS[width]).ravel()
        return out


@dataclass(frozen=True)
class Accepted:
    """Bodies a template accepted, for the chain check: the record positions of their entries, the
    names of their metrics (the body's order) and the values (positions × names)."""

    positions: np.ndarray
    names: tuple[str, ...]
    values: np.ndarray


_FLOATS: dict[int, np.dtype[Any]] = {2: np.dtype(">f2"), 4: np.dtype(">f4"), 8: np.dtype(">f8")}


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


def template(data: bytes, model: StepBody) -> Template | None:
    """The template of a body that passed the full check and read as ``model``, or None when its
    shape is not one this reader takes (a float or typed array outside ``metrics`` other than the
    :data:`ARRAYS`, an array field that is not a typed array, or ``hyper``)."""
    fixed = np.ones(len(data), dtype=bool)
    floats: list[tuple[int, int]] = []
    arrays: dict[str, tuple[int, int, np.dtype[Any]]] = {}
    metric_floats: list[tuple[int, int]] = []
    for p in payloads(data):
        fixed[p.start:p.start + p.size] = False
        if p.info:
            floats.append((p.start, p.size))
            if p.key == "metrics" and p.depth == 1:
                metric_floats.append((p.start, p.size))
        elif p.tag is not None and p.key in ARRAYS and p.depth == 0:
            arrays[p.key] = (p.start, p.size, _DTYPES[p.tag])
        if (p.info or p.tag is not None) and p.key != "metrics" and p.key not in arrays:
            return None
    if model.hyper is not None or any(getattr(model, name) is not None and name not in arrays for name in ARRAYS):
        return None
    where = np.flatnonzero(fixed)
    return Template(len(data), where, np.frombuffer(data, dtype=np.uint8)[where].copy(), tuple(floats), arrays,
                    _metrics(data, tuple(metric_floats)))


def _metrics(data: bytes, floats: tuple[tuple[int, int], ...]) -> tuple[tuple[str, ...],
                                                                      tuple[tuple[int, int], ...]] | None:
    """The metric names of an accepted body and the (position, width) of each one's float, given the
    floats directly under ``metrics``; None unless every metric is a float. The map's keys are text
    in increasing order (the deterministic encoding), so the decoded dict holds them in the body's
    order, and the floats at depth 1 are its values, in the same order."""
    metrics = decode_body(data).get("metrics", {})
    if not isinstance(metrics, dict) or len(floats) != len(metrics) \
            or not all(type(v) is float for v in metrics.values()):
        return None
    return tuple(metrics), floats
