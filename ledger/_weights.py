"""Weights without torch: safetensors files read into numpy arrays, and the count-sketch in numpy.

Everything here needs numpy and the standard library only, so the base install can read a
checkpoint and compute its sketch (docs/FORMAT.md §10) without torch. The sketch equals
:class:`ledger._fingerprint.CountSketch` up to float64 summation order.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ledger._fingerprint import _CHUNK, _DTYPE_SIZES, _MASK32, SKETCH_K, _name_salt, _read_header, _shard_files
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
def _entry(file: Path, name: str, info: Any, start: int, size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of a header entry, validated as ``safetensors_digests`` does."""
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{file}: tensor {name!r} has a malformed header entry") from None
    integers = [*shape, begin, end] if isinstance(shape, list) else None
    if not isinstance(dtype, str) or integers is None \
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in integers) \
            or any(d < 0 for d in shape):
        raise FormatError(f"{file}: tensor {name!r} has a malformed header entry")
    expected = _DTYPE_SIZES.get(dtype, 0) * math.prod(shape)
    wrong_size = dtype in _DTYPE_SIZES and end - begin != expected
    if not 0 <= begin <= end or start + end > size or wrong_size:
        raise FormatError(f"{file}: tensor {name!r} lies outside the file or has the wrong size")
    return dtype, tuple(shape), begin, end


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
    for file in _shard_files(Path(path)):
        try:
            handle = open(file, "rb")
        except FileNotFoundError:
            raise ConfigurationError(f"weights file {file} does not exist") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot read weights file {file}: {exc.strerror}") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) == 8 and 8 + struct.unpack("<Q", prefix)[0] > size:
                raise FormatError(f"{file} is not a safetensors file (its header is longer than the file)")
            handle.seek(0)
            header, start = _read_header(handle, file)
            entries = {name: _entry(file, name, info, start, size)
                       for name, info in header.items() if name != "__metadata__"}
            for name in entries:
                if name in seen:
                    raise FormatError(f"tensor {name!r} appears in more than one shard")
                seen.add(name)
            chosen = [name for name in entries if wanted is None or name in wanted]
            if not chosen:
                continue
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for name in chosen:
                    dtype, shape, begin, _ = entries[name]
                    tensors[name] = _materialise(file, name, dtype, shape, data, start + begin)
    if wanted is not None and wanted - seen:
        missing = ", ".join(repr(n) for n in sorted(wanted - seen))
        raise ConfigurationError(f"{path} holds no tensor named {missing}")
    return tensors


# ----------------------------------------------------------------------------- count-sketch
def _mul32(x: npt.NDArray[np.int64], c: int) -> npt.NDArray[np.int64]:
    # (x * c) mod 2^32 without int64 overflow: split c into 16-bit halves (as ledger._fingerprint does)
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _MASK32


def _fmix32(x: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _check_k(k: int) -> None:
    if k < 2 or k & (k - 1):
        raise ConfigurationError("the sketch size k must be a power of two ≥ 2")


def sketch_slots_numpy(seed: int, name: str, start: int, stop: int, k: int) -> npt.NDArray[np.int64]:
    """Slot of each coordinate in [start, stop) of tensor ``name``: bucket b ∈ [0, k) with sign +
    is slot b, with sign − slot k + b (int64). Equal to ``ledger._fingerprint.sketch_slots``."""
    _check_k(k)
    a, b = _name_salt(seed, name)
    index = np.arange(start, stop, dtype=np.int64)
    h = _fmix32(_fmix32((index & _MASK32) ^ a) ^ (((index >> 32) + b) & _MASK32))
    return (h & (k - 1)) + k * (h >> 31)


class NumpySketch:
    """The seeded count-sketch of ``ledger._fingerprint.CountSketch`` on numpy arrays: the same
    buckets and signs, accumulated in float64, so the two agree up to summation order. Extra
    memory stays proportional to one chunk of coordinates, whatever the tensor sizes."""

    def __init__(self, seed: int, k: int = SKETCH_K) -> None:
        """A sketch with ``k`` buckets (a power of two ≥ 2) under ``seed``."""
        _check_k(k)
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
