"""Blocked tensor digests (``tensor-blocked/v1``, docs/FORMAT.md §10.1): a tensor digest that can be
computed piecewise, so that ranks holding shards of one tensor (FSDP2) can each hash their own
elements and a combined digest equals the one-process digest of the whole tensor.

The tensor's flattened little-endian bytes are cut into blocks of :data:`BLOCK_ELEMENTS` elements at
global offsets (the last block may be shorter); each block is hashed on its own, and the digest is one
SHA-256 over the tensor's name, dtype and shape and the block hashes in order. A contiguous element
range ``[start, stop)`` of a tensor gives a :class:`Piece`: the hashes of the blocks it holds whole
and its edge fragments (the bytes of the at most two blocks it holds only in part), which
:func:`combine` joins with the other ranks' pieces, refusing any set of pieces that does not cover
every element exactly once. Pure functions on bytes; no torch.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ledger._filehash import CHUNK, Span, hash_blocks
from ledger._fingerprint import _DTYPE_SIZES, TensorEntry, hash_safetensors, safetensors_digests, tensor_digest
from ledger.errors import ConfigurationError

TENSOR_V1 = "tensor/v1"
TENSOR_BLOCKED_V1 = "tensor-blocked/v1"
SCHEMES = (TENSOR_V1, TENSOR_BLOCKED_V1)
BLOCKED_DOMAIN = b"training-ledger/tensor-blocked/v1\x00"
BLOCK_DOMAIN = b"training-ledger/tensor-block/v1\x00"
BLOCK_ELEMENTS = 1 << 16  # elements per block, whatever the dtype (docs/FORMAT.md §10.1 says why)
HASH = 32
_PARALLEL_BLOCKS = 64  # hash on several threads from this many blocks on (hashlib releases the GIL)
_GROUP = 16  # blocks per thread task
_BLOCK_PREFIX = hashlib.sha256(BLOCK_DOMAIN)


def block_count(elements: int) -> int:
    """Number of blocks of a tensor of ``elements`` elements (0 for an empty tensor)."""
    return -(-elements // BLOCK_ELEMENTS)


def _itemsize(dtype: str) -> int:
    try:
        return _DTYPE_SIZES[dtype]
    except KeyError:
        raise ConfigurationError(f"unknown safetensors dtype {dtype!r}") from None


def block_hashes(data: bytes | memoryview, itemsize: int, workers: int | None = None) -> bytes:
    """The 32-byte hashes, concatenated, of consecutive blocks of ``data`` starting at its first
    byte (the last block may be short). ``workers``: threads to hash on (default: up to 8 when
    there are many blocks; 1 hashes on the calling thread)."""
    view = memoryview(data).cast("B")
    size = BLOCK_ELEMENTS * itemsize
    count = -(-len(view) // size)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or count < _PARALLEL_BLOCKS:
        return hash_blocks(BLOCK_DOMAIN, view, size)
    step = size * _GROUP
    runs = [view[offset:offset + step] for offset in range(0, len(view), step)]
    with ThreadPoolExecutor(workers) as pool:
        return b"".join(pool.map(lambda run: hash_blocks(BLOCK_DOMAIN, run, size), runs))


def _finish(name: str, dtype: str, shape: Iterable[int], hashes: bytes) -> bytes:
    encoded, dims = name.encode("utf-8"), list(shape)
    if len(dims) > 255:
        raise ConfigurationError(f"tensor {name[:200]!r} has more than 255 dimensions")
    elements = 1
    for d in dims:
        elements *= d
    if len(hashes) != HASH * block_count(elements):
        raise ConfigurationError(f"tensor {name[:200]!r}: {len(hashes) // HASH} block hashes for "
                                 f"{block_count(elements)} blocks")
    h = hashlib.sha256(BLOCKED_DOMAIN + struct.pack(">I", len(encoded)) + encoded + struct.pack(">B", len(dtype))
                       + dtype.encode("ascii") + struct.pack(">B", len(dims)) + b"".join(struct.pack(">Q", d)
                                                                                        for d in dims)
                       + struct.pack(">Q", elements * _itemsize(dtype)) + struct.pack(">I", BLOCK_ELEMENTS)
                       + struct.pack(">Q", block_count(elements)))
    h.update(hashes)
    return h.digest()


def blocked_digest(name: str, dtype: str, shape: Iterable[int], data: bytes | memoryview,
                   workers: int | None = None) -> bytes:
    """The ``tensor-blocked/v1`` digest of a whole tensor from its little-endian C-order bytes."""
    dims = list(shape)
    view = memoryview(data).cast("B")
    elements = 1
    for d in dims:
        elements *= d
    if len(view) != elements * _itemsize(dtype):
        raise ConfigurationError(f"tensor {name[:200]!r}: {len(view)} bytes for {elements} elements of {dtype}")
    return _finish(name, dtype, dims, block_hashes(view, _itemsize(dtype), workers))


@dataclass(frozen=True, slots=True)
class Fragment:
    """The bytes of elements ``[start, start + len(data) / itemsize)`` of a block held in part."""

    start: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Piece:
    """What a holder of elements ``[start, stop)`` of a tensor contributes to its digest: the hashes
    (concatenated) of the blocks it holds whole, from block ``first_block`` on, and the bytes of the
    at most two blocks it holds in part (``fragments``, in order)."""

    start: int
    stop: int
    first_block: int
    hashes: bytes
    fragments: tuple[Fragment, ...]


def _layout(start: int, stop: int, total: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(first whole block, end of the whole blocks, the fragment ranges) of elements [start, stop)."""
    first = block_count(start)
    end = block_count(total) if stop == total else stop // BLOCK_ELEMENTS
    head_end = min(first * BLOCK_ELEMENTS, stop)
    tail_start = max(end * BLOCK_ELEMENTS, head_end)
    ranges = [(a, b) for a, b in ((start, head_end), (tail_start, stop)) if a < b]
    return first, max(first, end), ranges


def piece(dtype: str, total: int, start: int, data: bytes | memoryview, workers: int | None = None) -> Piece:
    """The piece of a tensor of ``total`` elements of ``dtype`` held as the bytes ``data`` of its
    elements from ``start`` on (a contiguous range of the flattened tensor)."""
    size = _itemsize(dtype)
    view = memoryview(data).cast("B")
    if len(view) % size:
        raise ConfigurationError(f"{len(view)} bytes are not a whole number of {dtype} elements")
    stop = start + len(view) // size
    if not 0 <= start <= stop <= total:
        raise ConfigurationError(f"elements [{start}, {stop}) lie outside a tensor of {total} elements")
    first, end, ranges = _layout(start, stop, total)
    lo, hi = (first * BLOCK_ELEMENTS - start) * size, (min(end * BLOCK_ELEMENTS, total) - start) * size
    hashes = block_hashes(view[lo:hi], size, workers) if end > first else b""
    fragments = tuple(Fragment(a, bytes(view[(a - start) * size:(b - start) * size])) for a, b in ranges)
    return Piece(start, stop, first, hashes, fragments)


def _check_piece(name: str, p: Piece, total: int, size: int) -> None:
    first, end, ranges = _layout(p.start, p.stop, total)
    got = [(f.start, f.start + len(f.data) // size) for f in p.fragments]
    if p.first_block != first or len(p.hashes) != HASH * (end - first) or got != ranges \
            or any(len(f.data) % size for f in p.fragments):
        raise ConfigurationError(f"tensor {name[:200]!r}: the piece of elements [{p.start}, {p.stop}) is malformed")


def combine(name: str, dtype: str, shape: Sequence[int], pieces: Iterable[Piece]) -> bytes:
    """The ``tensor-blocked/v1`` digest of a tensor from the pieces of every holder (in any order).
    Pieces that do not cover every element exactly once, or that are malformed, raise
    :class:`~ledger.errors.ConfigurationError` naming the tensor and the first gap or overlap."""
    size, total = _itemsize(dtype), 1
    for d in shape:
        total *= d
    ordered = sorted((p for p in pieces if p.stop > p.start), key=lambda p: (p.start, p.stop))
    position = 0
    for p in ordered:
        if not 0 <= p.start <= p.stop <= total:
            raise ConfigurationError(f"tensor {name[:200]!r}: a piece covers elements [{p.start}, {p.stop}) of "
                                     f"{total}")
        if p.start != position:
            what = "overlap" if p.start < position else "are covered by no rank"
            raise ConfigurationError(f"tensor {name[:200]!r}: elements [{min(p.start, position)}, "
                                     f"{max(p.start, position)}) {what}")
        _check_piece(name, p, total, size)
        position = p.stop
    if position != total:
        raise ConfigurationError(f"tensor {name[:200]!r}: elements [{position}, {total}) are covered by no rank")
    blocks: dict[int, bytes] = {}
    partial: dict[int, list[Fragment]] = {}
    for p in ordered:
        for i in range(len(p.hashes) // HASH):
            blocks[p.first_block + i] = p.hashes[HASH * i:HASH * (i + 1)]
        for f in p.fragments:
            partial.setdefault(f.start // BLOCK_ELEMENTS, []).append(f)
    for index, fragments in partial.items():  # in start order, and they tile the block (coverage above)
        h = _BLOCK_PREFIX.copy()
        for f in fragments:
            h.update(f.data)
        blocks[index] = h.digest()
    return _finish(name, dtype, shape, b"".join(blocks[i] for i in range(block_count(total))))


def _runs(e: TensorEntry, start: int) -> list[tuple[int, int]]:
    """A tensor's bytes (at ``start`` of the file) cut into runs of whole blocks of at most a read
    chunk each, so that a big tensor hashes on every thread."""
    block = BLOCK_ELEMENTS * _itemsize(e.dtype)
    step = max(block, CHUNK - CHUNK % block)
    return [(start + lo, start + min(lo + step, e.end)) for lo in range(e.begin, e.end, step)]


def safetensors_blocked_digests(path: str | os.PathLike[str], workers: int | None = None) -> dict[str, bytes]:
    """``tensor-blocked/v1`` digests of a safetensors file (or of every shard named by a
    ``*.index.json``), hashed from bounded reads of the file on ``workers`` threads (default all
    CPUs) without loading the tensors; the same reader and checks as
    :func:`ledger._fingerprint.safetensors_digests`."""
    def spans(name: str, e: TensorEntry, start: int) -> list[Span]:
        block = BLOCK_ELEMENTS * _itemsize(e.dtype)
        return [Span(f"{name}\x00{i}", BLOCK_DOMAIN, lo, hi, block) for i, (lo, hi) in enumerate(_runs(e, start))]

    entries, hashed = hash_safetensors(path, spans, workers=workers)
    return {name: _finish(name, e.dtype, e.shape, b"".join(hashed[f"{name}\x00{i}"]
                                                           for i in range(len(_runs(e, 0)))))
            for name, e in entries.items()}


# ----------------------------------------------------------------------------- the scheme a ledger states
def check_scheme(scheme: str) -> str:
    """The scheme, if it is one this package computes (else ConfigurationError)."""
    if scheme not in SCHEMES:
        raise ConfigurationError(f"unknown tensor digest scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return scheme


def digest_function(scheme: str) -> Callable[[str, str, Iterable[int], bytes | memoryview], bytes]:
    """The per-tensor digest ``f(name, dtype, shape, data)`` of a scheme (:data:`SCHEMES`)."""
    return blocked_digest if check_scheme(scheme) == TENSOR_BLOCKED_V1 else tensor_digest


def safetensors_digests_as(path: str | os.PathLike[str], scheme: str = TENSOR_V1) -> dict[str, bytes]:
    """Tensor digests of a safetensors file in the scheme a ledger's genesis states (its
    ``fingerprints.tensor_digest``): the one function verify compares files with ledger digests by."""
    if check_scheme(scheme) == TENSOR_BLOCKED_V1:
        return safetensors_blocked_digests(path)
    return safetensors_digests(path)
