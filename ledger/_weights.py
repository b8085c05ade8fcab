"""Weights without torch: safetensors files read into numpy arrays, and the count-sketch in numpy.

Everything here needs numpy and the standard library only, so the base install can read a
checkpoint and compute its sketch (docs/FORMAT.md §10) without torch. The sketch equals
:class:`ledger.torch.CountSketch` up to float64 summation order.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ledger._filehash import read_exact, threads
from ledger._fingerprint import (
    _CHUNK,
    _MASK32,
    SKETCH_K,
    Shard,
    TensorEntry,
    _name_salt,
    _open_shard,
    check_sketch_k,
    read_shards,
    sketch_hash,
)
from ledger.errors import ConfigurationError, FormatError

__all__ = ["Fingerprints", "NumpySketch", "TensorFile", "file_fingerprints", "map_runs", "read_safetensors",
           "sketch_slots_numpy"]

# safetensors dtype → little-endian layout of its bytes in the file
_FILE_LAYOUT: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}
_NEEDS_TORCH = frozenset({"F8_E4M3", "F8_E5M2"})


# ----------------------------------------------------------------------------- safetensors files
def _layout(file: Path, name: str, dtype: str) -> np.dtype[Any]:
    """The numpy layout of a tensor's bytes in the file (FormatError for what numpy cannot read)."""
    if dtype in _NEEDS_TORCH:
        raise FormatError(f"{file}: tensor {name!r} of dtype {dtype} cannot be read without torch")
    layout = _FILE_LAYOUT.get(dtype)
    if layout is None:
        raise FormatError(f"{file}: tensor {name!r} has the unknown dtype {dtype!r}")
    return layout


def _read(shard: Shard, offset: int, out: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``out`` filled with the file's bytes at ``offset`` of the shard's data section."""
    read_exact(shard.fd, shard.file, shard.start + offset, out.data.cast("B"))
    return out


def _native(raw: npt.NDArray[Any], dtype: str) -> npt.NDArray[Any]:
    """File-layout values in native byte order: BF16 widened to float32 (exactly: bfloat16 is the
    high half of a float32), BOOL as bool, the rest as they are (copied only to swap bytes)."""
    if dtype == "BF16":
        widened: npt.NDArray[Any] = (raw.astype(np.uint32) << 16).view(np.float32)
        return widened
    if dtype == "BOOL":
        flags: npt.NDArray[np.bool_] = raw != 0
        return flags
    return raw.astype(raw.dtype.newbyteorder("="), copy=False)


def _materialise(shard: Shard, name: str, e: TensorEntry) -> npt.NDArray[Any]:
    """An owned, native-byte-order copy of one tensor, read from the file into the array."""
    layout = _layout(shard.file, name, e.dtype)
    raw = _read(shard, e.begin, np.empty(math.prod(e.shape), dtype=layout))
    return _native(raw, e.dtype).reshape(e.shape)


def _chunks(shard: Shard, name: str, e: TensorEntry) -> Iterator[npt.NDArray[np.float64]]:
    """A tensor's elements in C order as float64, :data:`_CHUNK` at a time (the chunks
    :class:`NumpySketch` takes), read through one buffer: memory stays O(chunk)."""
    layout = _layout(shard.file, name, e.dtype)
    n = math.prod(e.shape)
    buffer = np.empty(min(n, _CHUNK), dtype=layout)
    for lo in range(0, n, _CHUNK):
        raw = _read(shard, e.begin + lo * layout.itemsize, buffer[:min(_CHUNK, n - lo)])
        yield _native(raw, e.dtype).astype(np.float64)


def _with_squares(chunks: Iterable[npt.NDArray[np.float64]], squares: list[float]) -> Iterator[npt.NDArray[np.float64]]:
    """The chunks, each one's sum of squares appended to ``squares`` as it passes."""
    for chunk in chunks:
        squares.append(float(np.dot(chunk, chunk)))
        yield chunk


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
                tensors[name] = _materialise(shard, name, e)
    if wanted is not None and wanted - seen:
        missing = ", ".join(repr(n) for n in sorted(wanted - seen))
        raise ConfigurationError(f"{path} holds no tensor named {missing}")
    return tensors


class TensorFile:
    """One safetensors file held open, its header validated and every tensor's dtype readable
    (FormatError otherwise), each tensor read by name in float64 chunks (:meth:`chunks`), never
    whole and never memory-mapped: two stored states compared tensor by tensor take memory
    O(chunk), whatever the model's size. A single file (a checkpoint's ``model.safetensors``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        file = Path(path)
        self._stack = ExitStack()
        try:
            handle, self.entries, start, _ = _open_shard(file, file, set(), self._stack)
            for name, e in self.entries.items():
                _layout(file, name, e.dtype)
        except BaseException:
            self._stack.close()
            raise
        self._shard = Shard(file, self.entries, handle.fileno(), start)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Each tensor's shape and safetensors dtype, from the header."""
        return {name: (e.shape, e.dtype) for name, e in self.entries.items()}

    def chunks(self, name: str) -> Iterator[npt.NDArray[np.float64]]:
        """Tensor ``name``'s elements in C order as float64, :data:`_CHUNK` at a time (the chunks
        :class:`NumpySketch` takes; bf16 exactly, as :func:`read_safetensors` reads it)."""
        return _chunks(self._shard, name, self.entries[name])


Fingerprint = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None]  # (norms, sketch or None)


class Fingerprints:
    """The L2 norms (float64) and, with a ``sketcher``, the sketch of tensors taken one at a time
    as streams of float64 chunks (:meth:`take`), then put in a ledger's order (:meth:`result`)."""

    def __init__(self, sketcher: NumpySketch | None) -> None:
        self.sketcher = sketcher
        self._squares: dict[str, list[float]] = {}
        self._signed: dict[str, npt.NDArray[np.float64] | None] = {}

    def take(self, name: str, chunks: Iterable[npt.NDArray[np.float64]]) -> None:
        """Read tensor ``name``'s chunks (in C order) to the end."""
        chunks = _with_squares(chunks, self._squares.setdefault(name, []))
        if self.sketcher is not None and name not in self.sketcher.skip:
            self._signed[name] = self.sketcher.signed(name, chunks)
        else:
            collections.deque(chunks, maxlen=0)  # read for the norms alone

    def result(self, order: Sequence[str]) -> Fingerprint | None:
        """The norms (one per name of ``order``) and the sketch summed in that order; None when a
        name of ``order`` was not taken."""
        if any(n not in self._squares for n in order):
            return None
        norms = np.sqrt(np.array([math.fsum(self._squares[n]) for n in order], dtype=np.float64))
        sketcher = self.sketcher
        if sketcher is None:
            return norms, None
        return norms, sketcher.total(self._signed[n] for n in dict.fromkeys(order) if n not in sketcher.skip)


def file_fingerprints(path: str | os.PathLike[str], order: Sequence[str],
                      sketcher: NumpySketch | None) -> Fingerprint | None:
    """The L2 norms (float64, one per name of ``order``) of tensors of a safetensors file (or of
    every shard named by a ``*.index.json``) and, with a ``sketcher``, their sketch: what
    :func:`read_safetensors` and the sketcher give (the sketch equal, the norms up to summation
    order), in one bounded pass over the file — memory O(:data:`_CHUNK`), whatever its size.
    Every tensor is read as :func:`read_safetensors` reads it (FormatError for one it cannot read);
    None when a name of ``order`` is in no file."""
    wanted = set(order)
    found = Fingerprints(sketcher)
    for shard in read_shards(path):
        for name, e in shard.entries.items():
            _layout(shard.file, name, e.dtype)
            if name in wanted:
                found.take(name, _chunks(shard, name, e))
    return found.result(order)


# ----------------------------------------------------------------------------- count-sketch
def sketch_slots_numpy(seed: int, name: str, start: int, stop: int, k: int) -> npt.NDArray[np.int64]:
    """Slot of each coordinate in [start, stop) of tensor ``name``: bucket b ∈ [0, k) with sign +
    is slot b, with sign − slot k + b (int64). Equal to :func:`ledger.torch.sketch_slots`."""
    check_sketch_k(k)
    start, stop = int(start), max(int(start), int(stop))  # numpy integers would overflow the run arithmetic
    if k > 1 << 31:  # slots past what uint32 holds: the reference arithmetic
        slots: npt.NDArray[np.int64] = sketch_hash(np.arange(start, stop, dtype=np.int64), seed, name, k)
        return slots
    salts = _name_salt(seed, name)
    out = np.empty(stop - start, dtype=np.int64)
    map_runs(lambda lo, hi: _hash_run(out, start, (lo, hi), salts, k), start, stop)
    return out


_RUN = 1 << 18  # coordinates one thread takes at a time (2 MiB of float64): fixed, so no sum depends on the threads
_T = TypeVar("_T")


def map_runs(fn: Callable[[int, int], _T], start: int, stop: int) -> list[_T]:
    """``fn(lo, hi)`` for each run [lo, hi) of :data:`_RUN` indices that cuts [start, stop) from
    ``start``, the results in order; on every CPU when there are several runs (numpy releases the
    GIL). The runs are the same whatever the threads, so results folded in order are too."""
    runs = [(lo, min(stop, lo + _RUN)) for lo in range(start, stop, _RUN)]
    workers = min(threads(), len(runs))
    if workers < 2:
        return [fn(lo, hi) for lo, hi in runs]
    with ThreadPoolExecutor(workers, thread_name_prefix="ledger-runs") as pool:
        return list(pool.map(lambda run: fn(*run), runs))


def _hash_run(out: npt.NDArray[np.int64], start: int, run: tuple[int, int], salts: tuple[int, int], k: int) -> None:
    """``out[lo − start : hi − start]`` := the slots of the indices of ``run`` = [lo, hi), hashed in
    uint32 in place."""
    (lo, hi), (a, b) = run, salts
    while lo < hi:  # within a run of 2^32 indices the high word is one number
        end = min(hi, ((lo >> 32) + 1) << 32)
        x = np.arange(lo & _MASK32, (lo & _MASK32) + (end - lo), dtype=np.uint32)
        scratch = np.empty_like(x)
        x ^= np.uint32(a)
        _fmix32_inplace(x, scratch)
        x ^= np.uint32(((lo >> 32) + b) & _MASK32)
        _fmix32_inplace(x, scratch)
        np.right_shift(x, 31, out=scratch)  # the sign bit: slot k + b for −
        scratch *= np.uint32(k)
        x &= np.uint32(k - 1)
        x += scratch
        out[lo - start:end - start] = x
        lo = end


def _fmix32_inplace(x: npt.NDArray[np.uint32], scratch: npt.NDArray[np.uint32]) -> None:
    """MurmurHash3's fmix32 on uint32 values, in place (uint32 products wrap modulo 2^32 as the
    reference's ``_mul32`` computes them in int64)."""
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        np.right_shift(x, shift, out=scratch)
        x ^= scratch
        x *= np.uint32(factor)
    np.right_shift(x, 16, out=scratch)
    x ^= scratch


class NumpySketch:
    """The seeded count-sketch of :class:`ledger.torch.CountSketch` on numpy arrays: the same
    buckets and signs, accumulated in float64, so the two agree up to summation order. Extra
    memory stays proportional to one chunk of coordinates, whatever the tensor sizes."""

    def __init__(self, seed: int, k: int = SKETCH_K, skip: Iterable[str] = ()) -> None:
        """A sketch with ``k`` buckets (a power of two ≥ 2) under ``seed``, leaving out the tensors
        named in ``skip`` (genesis ``fingerprints.sketch_skips``)."""
        check_sketch_k(k)
        self.seed, self.k, self.skip = seed, k, frozenset(skip)

    @classmethod
    def of(cls, policy: Any) -> NumpySketch:
        """The sketch a ledger's fingerprint policy (:class:`ledger._schema.FingerprintPolicy`) defines."""
        return cls(policy.sketch_seed, policy.sketch_k, policy.sketch_skips)

    def __call__(self, tensors: Mapping[str, npt.ArrayLike]) -> npt.NDArray[np.float64]:
        """The sketch (float64, k values) of the named arrays not in ``skip``, summed over arrays.
        Each array is taken in C order; bool, integer and floating arrays are widened to float64."""
        parts = []
        for name, tensor in tensors.items():
            if name in self.skip:
                continue
            array = np.asarray(tensor)
            if array.dtype.kind not in "biuf":
                raise ConfigurationError(f"tensor {name!r} of dtype {array.dtype} cannot be sketched")
            flat = array.reshape(-1) if array.flags.c_contiguous else None  # a view; otherwise copy per chunk
            parts.append(self.signed(name, ((flat[lo:lo + _CHUNK] if flat is not None else array.flat[lo:lo + _CHUNK])
                                            .astype(np.float64) for lo in range(0, array.size, _CHUNK))))
        return self.total(parts)

    def signed(self, name: str, chunks: Iterable[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64] | None:
        """The sketch of one tensor (k values) from its float64 elements in C order, in chunks of
        :data:`_CHUNK` elements (the last may be shorter); None for a tensor with no element."""
        k, lo = self.k, 0
        acc = np.zeros(2 * k, dtype=np.float64)
        for chunk in chunks:
            def part(a: int, b: int, chunk: npt.NDArray[np.float64] = chunk, lo: int = lo) -> npt.NDArray[Any]:
                slots = sketch_slots_numpy(self.seed, name, lo + a, lo + b, k)
                return np.bincount(slots, weights=chunk[a:b], minlength=2 * k)

            if 2 * k <= _RUN // 16:  # each run's slot sums on its thread, added in order
                for summed in map_runs(part, 0, len(chunk)):
                    acc += summed
            else:  # so many slots that a run's sums would outweigh the run: one bincount of the chunk
                acc += part(0, len(chunk))
            lo += len(chunk)
        return acc[:k] - acc[k:] if lo else None

    def total(self, parts: Iterable[npt.NDArray[np.float64] | None]) -> npt.NDArray[np.float64]:
        """The sketch of several tensors: the sum of their :meth:`signed` sketches, in order."""
        total: npt.NDArray[np.float64] | None = None
        for signed in parts:
            if signed is not None:
                total = signed if total is None else total + signed
        return np.zeros(self.k) if total is None else total
