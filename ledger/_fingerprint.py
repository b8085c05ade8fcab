"""Fingerprints of weights: tensor digests, model digests and the count-sketch.

Digests are defined on (name, dtype, shape, little-endian contiguous bytes), so a tensor in memory
and the same tensor in a safetensors file give the same digest (docs/FORMAT.md §10). torch is
imported only inside the functions that take tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger._filehash import Cancelled, OpenFile, Span, hash_spans
from ledger._io import open_regular, read_regular
from ledger.errors import ConfigurationError, FormatError

TENSOR_DOMAIN = b"training-ledger/tensor/v1\x00"
MODEL_DOMAIN = b"training-ledger/model/v1\x00"
SKETCH_DOMAIN = b"training-ledger/sketch/v1\x00"
SKETCH_K = 256
_CHUNK = 1 << 22  # elements per sketch chunk: extra memory stays O(chunk)
_MASK32 = 0xFFFFFFFF

# torch dtype name → safetensors dtype string
TORCH_TO_SAFETENSORS = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}


def _tensor_prefix(name: str, dtype: str, shape: Iterable[int], nbytes: int) -> bytes:
    encoded, dims = name.encode("utf-8"), list(shape)
    return (TENSOR_DOMAIN + struct.pack(">I", len(encoded)) + encoded + struct.pack(">B", len(dtype))
            + dtype.encode("ascii") + struct.pack(">B", len(dims)) + b"".join(struct.pack(">Q", d) for d in dims)
            + struct.pack(">Q", nbytes))


def tensor_digest(name: str, dtype: str, shape: Iterable[int], data: bytes | memoryview) -> bytes:
    """SHA-256 over the domain-separated (name, safetensors dtype, shape, little-endian bytes)."""
    view = memoryview(data).cast("B")
    digest = hashlib.sha256(_tensor_prefix(name, dtype, shape, view.nbytes))
    digest.update(view)
    return digest.digest()


def model_digest(digests: Mapping[str, bytes]) -> bytes:
    """SHA-256 over the tensor digests ordered by UTF-8 tensor name."""
    h = hashlib.sha256(MODEL_DOMAIN + struct.pack(">Q", len(digests)))
    for name in sorted(digests, key=lambda n: n.encode("utf-8")):
        encoded = name.encode("utf-8")
        h.update(struct.pack(">I", len(encoded)) + encoded + digests[name])
    return h.digest()


# ----------------------------------------------------------------------------- safetensors files
MAX_HEADER_BYTES = 16 << 20  # a safetensors JSON header larger than this is refused (docs/FORMAT.md §10)
MAX_INDEX_BYTES = 16 << 20  # and so is a ``*.index.json`` larger than this
_OPEN_AT_ONCE = 64  # shard files held open together while their tensors are hashed
_MAX_DIMS = 255  # the tensor digest carries ndim in one byte


def _json(raw: bytes, what: str) -> Any:
    # A header is an object of small objects: at most one container per 8 bytes (an honest one
    # has about one per 17), which bounds the Python objects json builds to a few times its size.
    if raw.count(b"{") + raw.count(b"[") > len(raw) // 8 + 8:
        raise FormatError(f"{what} is not a safetensors header (too many nested objects)")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"{what} (bad JSON: {str(exc)[:200]})") from None


def _read_header(handle: Any, path: Path, size: int) -> tuple[dict[str, Any], int]:
    raw = handle.read(8)
    if len(raw) != 8:
        raise FormatError(f"{path} is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", raw)
    if length > MAX_HEADER_BYTES:
        raise FormatError(f"{path} is not a safetensors file (header of {length} bytes; at most "
                          f"{MAX_HEADER_BYTES >> 20} MiB are read)")
    if 8 + length > size:
        raise FormatError(f"{path} is not a safetensors file (its header is longer than the file)")
    header = _json(handle.read(length), f"{path} is not a safetensors file")
    if not isinstance(header, dict):
        raise FormatError(f"{path} is not a safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: the safetensors __metadata__ is not a map of text to text")
    return header, 8 + length


def _shard_files(path: Path) -> list[Path]:
    if path.name.endswith(".index.json"):
        try:
            raw = read_regular(path, what="safetensors index", limit=MAX_INDEX_BYTES)
        except FileNotFoundError:
            raise ConfigurationError(f"weights index {path} does not exist") from None
        index = _json(raw, f"{path} is not a safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FormatError(f"{path} is not a safetensors index (no weight_map of tensor names to files)")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
                raise FormatError(f"{path}: shard {name!r} is not a file name next to the index")
        return [path.parent / name for name in names]
    return [path]


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a safetensors header, validated: its dtype, shape and byte range (relative to
    the start of the data section)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _entry(file: Path, name: str, info: Any, start: int, size: int) -> TensorEntry:
    bad = f"{file}: tensor {name[:200]!r} has a malformed header entry"
    if not isinstance(info, dict):
        raise FormatError(bad)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list) \
            or len(offsets) != 2 or len(shape) > _MAX_DIMS:
        raise FormatError(bad)
    integers = [*shape, *offsets]
    if not all(type(v) is int for v in integers) or any(d < 0 or d >= 1 << 64 for d in shape):
        raise FormatError(bad)
    if dtype not in _DTYPE_SIZES:
        raise FormatError(f"{file}: tensor {name[:200]!r} has the unknown dtype {dtype[:40]!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{file}: a tensor name is not valid UTF-8") from None
    begin, end = offsets
    if not 0 <= begin <= end or start + end > size or end - begin != _DTYPE_SIZES[dtype] * math.prod(shape):
        raise FormatError(f"{file}: tensor {name[:200]!r} lies outside the file or has the wrong size")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_layout(file: Path, entries: dict[str, TensorEntry], data_size: int) -> None:
    """Tensors lie back to back and fill the data section exactly (as the safetensors format
    requires): no overlap, no hole, nothing after the last one."""
    position = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != position:
            raise FormatError(f"{file}: tensor {name[:200]!r} " + ("overlaps the one before it" if e.begin < position
                                                                  else "leaves a hole before it"))
        position = e.end
    if position != data_size:
        raise FormatError(f"{file}: the tensors cover {position} of the {data_size} data bytes")


@dataclass(frozen=True, slots=True)
class Shard:
    """One file of a safetensors checkpoint: its validated header entries and the descriptor of the
    open file (tensor bytes at ``start + entry.begin`` to ``start + entry.end``, read with
    :func:`ledger._filehash.read_exact`), valid only until the next shard is read."""

    file: Path
    entries: dict[str, TensorEntry]
    fd: int
    start: int


def _open_shard(file: Path, path: Path, seen: set[str],
                stack: ExitStack) -> tuple[Any, dict[str, TensorEntry], int, int]:
    """One file of a safetensors checkpoint, opened in ``stack``, its header validated (the names in
    ``seen`` are taken by earlier shards; its own are added): (handle, entries, data start, size)."""
    try:
        handle = stack.enter_context(open_regular(file, what="weights file"))
    except FileNotFoundError:
        if file == path:
            raise ConfigurationError(f"weights file {file} does not exist") from None
        raise FormatError(f"weights file {file} (named by {path.name}) does not exist") from None
    size = os.fstat(handle.fileno()).st_size
    header, start = _read_header(handle, file, size)
    entries = {name: _entry(file, name, info, start, size) for name, info in header.items() if name != "__metadata__"}
    _check_layout(file, entries, size - start)
    for name in entries:
        if name in seen:
            raise FormatError(f"tensor {name[:200]!r} appears in more than one shard")
        seen.add(name)
    return handle, entries, start, size


def read_shards(path: str | os.PathLike[str]) -> Iterator[Shard]:
    """Each file of a safetensors file (or of every shard named by a ``*.index.json``), its header
    validated against the file's size (malformed, or not a regular file → FormatError naming file
    and tensor; a tensor in two shards → FormatError; a missing file → ConfigurationError, a missing
    shard an index names → FormatError), open for bounded reads (never memory-mapped)."""
    seen: set[str] = set()
    for file in _shard_files(Path(path)):
        with ExitStack() as stack:
            handle, entries, start, _ = _open_shard(file, Path(path), seen, stack)
            yield Shard(file, entries, handle.fileno(), start)


def safetensors_digests(path: str | os.PathLike[str], *, workers: int | None = None,
                        cancel: threading.Event | None = None) -> dict[str, bytes]:
    """Tensor digests of a safetensors file (or of every shard named by a ``*.index.json``),
    hashed from the file's raw bytes without loading the tensors: the same checks as
    :func:`read_shards`, tensors hashed in parallel threads (``workers``, default all CPUs) from
    bounded reads (not a memory map), so memory stays a few MiB per thread whatever the size.
    ``cancel``: set, it stops the hashing (:class:`ledger._filehash.Cancelled`)."""
    def spans(name: str, e: TensorEntry, start: int) -> list[Span]:
        return [Span(name, _tensor_prefix(name, e.dtype, e.shape, e.end - e.begin), start + e.begin, start + e.end)]

    return hash_safetensors(path, spans, workers=workers, cancel=cancel)[1]


def hash_safetensors(path: str | os.PathLike[str], spans: Callable[[str, TensorEntry, int], Iterable[Span]], *,
                     workers: int | None = None,
                     cancel: threading.Event | None = None) -> tuple[dict[str, TensorEntry], dict[str, bytes]]:
    """The validated entries of every tensor of a safetensors file (or of every shard named by a
    ``*.index.json``; the checks of :func:`read_shards`) and the digests of the spans that
    ``spans(name, entry, data_start)`` gives for each (keys unique over the whole checkpoint),
    hashed as :func:`ledger._filehash.hash_spans` does: bounded reads on ``workers`` threads."""
    entries: dict[str, TensorEntry] = {}
    digests: dict[str, bytes] = {}
    seen: set[str] = set()
    files = _shard_files(Path(path))
    for lo in range(0, len(files), _OPEN_AT_ONCE):  # a bounded number of files open at once
        with ExitStack() as stack:
            batch = []
            for file in files[lo:lo + _OPEN_AT_ONCE]:
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                handle, held, start, _ = _open_shard(file, Path(path), seen, stack)
                entries.update(held)
                batch.append(OpenFile(handle.fileno(), file, [s for name, e in held.items()
                                                              for s in spans(name, e, start)]))
            digests.update(hash_spans(batch, workers=workers, cancel=cancel))
    return entries, digests


# ----------------------------------------------------------------------------- count-sketch
def _name_salt(seed: int, name: str) -> tuple[int, int]:
    h = hashlib.sha256(SKETCH_DOMAIN + struct.pack(">Q", seed & 0xFFFFFFFFFFFFFFFF) + name.encode("utf-8")).digest()
    return int.from_bytes(h[:4], "big"), int.from_bytes(h[4:8], "big")


def _mul32(x: Any, c: int) -> Any:
    # (x * c) mod 2^32 without int64 overflow: split c into 16-bit halves
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _MASK32


def _fmix32(x: Any) -> Any:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def sketch_hash(index: Any, seed: int, name: str, k: int) -> Any:
    """Slot of each coordinate index (an int64 array of numpy or torch: only operators are used)
    of tensor ``name``: bucket b ∈ [0, k) with sign + is slot b, with sign − slot k + b
    (docs/FORMAT.md §10)."""
    a, b = _name_salt(seed, name)
    h = _fmix32(_fmix32((index & _MASK32) ^ a) ^ ((index >> 32) + b) & _MASK32)
    return (h & (k - 1)) + k * (h >> 31)


def check_sketch_k(k: int) -> None:
    """Refuse a sketch size that is not a power of two ≥ 2."""
    if k < 2 or k & (k - 1):
        raise ConfigurationError("the sketch size k must be a power of two ≥ 2")


BATCH_DOMAIN = b"training-ledger/batch/v1\x00"

