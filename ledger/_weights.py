"""Weights without torch: safetensors files read into numpy arrays, and the count-sketch in numpy.

Everything here needs numpy and the standard library only, so the base install can read a
checkpoint and compute its sketch (docs/FORMAT.md §10) without torch. The sketch equals
:class:`ledger.torch.CountSketch` up to float64 summation order.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ledger._fingerprint import _CHUNK, SKETCH_K, check_sketch_k, read_shards, sketch_hash
from ledger.errors import ConfigurationError, FormatError

__all__ = ["NumpySketch", "read_safetensors", "sketch_slots_numpy"]

# safetensors dtype → little-endian layout of its bytes in the file
_FILE_LAYOUT: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}
_NEEDS_TORCH = frozenset({"F8_E4M3", "F8_E5M2"})


# ----------------------------------------------------------------------------- safetensors files
def _materialise(file: Path, name: str, dtype: str, shape: tuple[int, ...], data: mmap.mmap,
                 offset: int) -> npt.NDArray[Any]:
    """An owned, native-byte-order copy of one tensor's bytes at ``offset`` of the mapped file."""
    if dtype in _NEEDS_TORCH:
        raise FormatError(f"{file}: tensor {name!r} of dtype {dtype} cannot be read without torch")
    layout = _FILE_LAYOUT.get(dtype)
    if layout is None:
        raise FormatError(f"{file}: tensor {name!r} has the unknown dtype {dtype!r}")
    raw = np.frombuffer(data, dtype=layout, count=math.prod(shape), offset=offset)
    try:  # `raw` pins the mapping: it must be gone before the mapping is closed, exception or not
        if dtype == "BF16":  # bfloat16 is the high half of a float32: widening is exact
            out: npt.NDArray[Any] = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dtype == "BOOL":
            out = raw != 0
        else:
            out = raw.astype(layout.newbyteorder("="))  # a copy, in native byte order
    finally:
        del raw
    return out.reshape(shape)


def read_safetensors(path: str | os.PathLike[str], names: Iterable[str] | None = None) -> dict[str, npt.NDArray[Any]]:
    """The tensors of a safetensors file (or of every shard named by a ``*.index.json``) as numpy
    arrays, read from the file's bytes without torch or the ``safetensors`` package.

    Arrays are owned and in native byte order; BF16 comes back as float32 (exactly), BOOL as bool,
    the other dtypes as their numpy equivalents. ``names`` (a name or an iterable of names) limits
    which tensors are read; the others are validated but not loaded. F8 tensors cannot be read
    without torch (FormatError if asked for). Raises FormatError for malformed files and
    ConfigurationError for a missing file or a requested name that no file holds.
    """
    wanted = None if names is None else {names} if isinstance(names, str) else set(names)
    seen: set[str] = set()
    tensors: dict[str, npt.NDArray[Any]] = {}
    for shard in read_shards(path):
        seen.update(shard.entries)
        for name, e in shard.entries.items():
            if wanted is None or name in wanted:
                tensors[name] = _materialise(shard.file, name, e.dtype, e.shape, shard.data, shard.start + e.begin)
    if wanted is not None and wanted - seen:
        missing = ", ".join(repr(n) for n in sorted(wanted - seen))
        raise ConfigurationError(f"{path} holds no tensor named {missing}")
    return tensors


# ----------------------------------------------------------------------------- count-sketch
def sketch_slots_numpy(seed: int, name: str, start: int, stop: int, k: int) -> npt.NDArray[np.int64]:
    """Slot of each coordinate in [start, stop) of tensor ``name``: bucket b ∈ [0, k) with sign +
    is slot b, with sign − slot k + b (int64). Equal to :func:`ledger.torch.sketch_slots`."""
    check_sketch_k(k)
    slots: npt.NDArray[np.int64] = sketch_hash(np.arange(start, stop, dtype=np.int64), seed, name, k)
    return slots


class NumpySketch:
    """The seeded count-sketch of :class:`ledger.torch.CountSketch` on numpy arrays: the same
    buckets and signs, accumulated in float64, so the two agree up to summation order. Extra
    memory stays proportional to one chunk of coordinates, whatever the tensor sizes."""

    def __init__(self, seed: int, k: int = SKETCH_K) -> None:
        """A sketch with ``k`` buckets (a power of two ≥ 2) under ``seed``."""
        check_sketch_k(k)
        self.seed, self.k = seed, k

    def __call__(self, tensors: Mapping[str, npt.ArrayLike]) -> npt.NDArray[np.float64]:
        """The sketch (float64, k values) of the named arrays, summed over arrays. Each array is
        taken in C order; bool, integer and floating arrays are widened to float64."""
        k = self.k
        total: npt.NDArray[np.float64] | None = None
        for name, tensor in tensors.items():
            array = np.asarray(tensor)
            if array.dtype.kind not in "biuf":
                raise ConfigurationError(f"tensor {name!r} of dtype {array.dtype} cannot be sketched")
            n = array.size
            if n == 0:
                continue
            flat = array.reshape(-1) if array.flags.c_contiguous else None  # a view; otherwise copy per chunk
            acc = np.zeros(2 * k, dtype=np.float64)
            for lo in range(0, n, _CHUNK):
                hi = min(lo + _CHUNK, n)
                chunk = flat[lo:hi] if flat is not None else array.flat[lo:hi]
                slots = sketch_slots_numpy(self.seed, name, lo, hi, k)
                acc += np.bincount(slots, weights=chunk.astype(np.float64), minlength=2 * k)
            signed = acc[:k] - acc[k:]
            total = signed if total is None else total + signed
        return np.zeros(k) if total is None else total
