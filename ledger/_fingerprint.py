"""Fingerprints of weights: tensor digests, model digests and the count-sketch.

Digests are defined on (name, dtype, shape, little-endian contiguous bytes), so a tensor in memory
and the same tensor in a safetensors file give the same digest (docs/FORMAT.md §10). torch is
imported only inside the functions that take tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
def _read_header(handle: Any, path: Path, size: int) -> tuple[dict[str, Any], int]:
    raw = handle.read(8)
    if len(raw) != 8:
        raise FormatError(f"{path} is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", raw)
    if length > 100 << 20:
        raise FormatError(f"{path} is not a safetensors file (header of {length} bytes)")
    if 8 + length > size:
        raise FormatError(f"{path} is not a safetensors file (its header is longer than the file)")
    try:
        header = json.loads(handle.read(length))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path} is not a safetensors file (bad header: {exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path} is not a safetensors file")
    return header, 8 + length


def _shard_files(path: Path) -> list[Path]:
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"{path} is not a safetensors index (no weight_map): {exc}") from None
        return [path.parent / name for name in sorted(set(weight_map.values()))]
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
    return TensorEntry(dtype, tuple(shape), begin, end)


@dataclass(frozen=True, slots=True)
class Shard:
    """One file of a safetensors checkpoint: its validated header entries and its mapped bytes
    (``data[start + entry.begin:start + entry.end]``), valid only until the next shard is read."""

    file: Path
    entries: dict[str, TensorEntry]
    data: Any
    start: int


def read_shards(path: str | os.PathLike[str]) -> Iterator[Shard]:
    """Each file of a safetensors file (or of every shard named by a ``*.index.json``), its header
    validated against the file's size (malformed → FormatError naming file and tensor; a tensor in
    two shards → FormatError; a missing file → ConfigurationError), its bytes memory-mapped."""
    seen: set[str] = set()
    for file in _shard_files(Path(path)):
        try:
            handle = open(file, "rb")
        except FileNotFoundError:
            raise ConfigurationError(f"weights file {file} does not exist") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot read weights file {file}: {exc.strerror}") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            header, start = _read_header(handle, file, size)
            entries = {name: _entry(file, name, info, start, size)
                       for name, info in header.items() if name != "__metadata__"}
            for name in entries:
                if name in seen:
                    raise FormatError(f"tensor {name!r} appears in more than one shard")
                seen.add(name)
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else _Empty() as data:
                yield Shard(file, entries, data, start)


def safetensors_digests(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Tensor digests of a safetensors file (or of every shard named by a ``*.index.json``),
    hashed from the file's raw bytes without loading the tensors."""
    digests: dict[str, bytes] = {}
    for shard in read_shards(path):
        for name, e in shard.entries.items():
            view = memoryview(shard.data)[shard.start + e.begin:shard.start + e.end]
            try:
                digests[name] = tensor_digest(name, e.dtype, e.shape, view)
            finally:
                view.release()
    return digests


class _Empty:
    def __enter__(self) -> bytes:
        return b""

    def __exit__(self, *exc: object) -> None:
        return None


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

