"""Fingerprints of weights: tensor digests, model digests and the count-sketch.

Digests are defined on (name, dtype, shape, little-endian contiguous bytes), so a tensor in memory
and the same tensor in a safetensors file give the same digest (docs/FORMAT.md §10). torch is
imported only inside the functions that take tensors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

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


# ----------------------------------------------------------------------------- torch side
def canonical_state(model_or_state: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors a model is fingerprinted by: its ``state_dict`` (parameters and persistent
    buffers), tied weights kept once under the lexicographically first name as
    ``safetensors.torch.save_model`` keeps them. Returns (tensors, aliases: dropped → kept)."""
    from safetensors.torch import _remove_duplicate_names

    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else dict(model_or_state)
    state = {name: tensor for name, tensor in state.items() if hasattr(tensor, "dtype")}
    aliases: dict[str, str] = {}
    for kept, dropped in _remove_duplicate_names(state).items():
        for name in dropped:
            aliases[name] = kept
            del state[name]
    return state, aliases


def safetensors_dtype(tensor: Any) -> str:
    """The safetensors dtype string of a torch tensor."""
    name = str(tensor.dtype).removeprefix("torch.")
    try:
        return TORCH_TO_SAFETENSORS[name]
    except KeyError:
        raise FormatError(f"tensors of dtype {name} cannot be fingerprinted") from None


@functools.cache
def _numpy_safe_dtypes() -> frozenset[Any]:
    import torch

    return frozenset({torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                      torch.uint8})


def tensor_bytes(tensor: Any) -> memoryview:
    """Little-endian contiguous bytes of a tensor, on the CPU (a copy; never touches the live tensor)."""
    import torch

    if tensor.device.type == "cpu" and tensor.dtype in _numpy_safe_dtypes() and tensor.is_contiguous() \
            and sys.byteorder == "little":
        return memoryview(tensor.detach().numpy()).cast("B")  # zero-copy fast path (no torch ops)
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
    if sys.byteorder != "little" and flat.element_size() > 1:
        raw = flat.numpy().byteswap().view(np.uint8)
    return memoryview(raw)  # type: ignore[arg-type]


def torch_digests(tensors: Mapping[str, Any]) -> dict[str, bytes]:
    """Tensor digests of named torch tensors (copied to the CPU one at a time)."""
    return {name: tensor_digest(name, safetensors_dtype(t), tuple(t.shape), tensor_bytes(t))
            for name, t in tensors.items()}


# ----------------------------------------------------------------------------- safetensors files
def _read_header(handle: Any, path: Path) -> tuple[dict[str, Any], int]:
    raw = handle.read(8)
    if len(raw) != 8:
        raise FormatError(f"{path} is not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", raw)
    if length > 100 << 20:
        raise FormatError(f"{path} is not a safetensors file (header of {length} bytes)")
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


def safetensors_digests(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Tensor digests of a safetensors file (or of every shard named by a ``*.index.json``),
    hashed from the file's raw bytes without loading the tensors."""
    digests: dict[str, bytes] = {}
    for file in _shard_files(Path(path)):
        try:
            handle = open(file, "rb")
        except FileNotFoundError:
            raise ConfigurationError(f"weights file {file} does not exist") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot read weights file {file}: {exc.strerror}") from None
        with handle:
            header, start = _read_header(handle, file)
            size = os.fstat(handle.fileno()).st_size
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else _Empty() as data:
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    try:
                        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
                    except (KeyError, TypeError, ValueError):
                        raise FormatError(f"{file}: tensor {name!r} has a malformed header entry") from None
                    expected = _DTYPE_SIZES.get(dtype, 0) * int(np.prod(shape, dtype=np.int64))
                    wrong_size = dtype in _DTYPE_SIZES and end - begin != expected
                    if not 0 <= begin <= end or start + end > size or wrong_size:
                        raise FormatError(f"{file}: tensor {name!r} lies outside the file or has the wrong size")
                    if name in digests:
                        raise FormatError(f"tensor {name!r} appears in more than one shard")
                    digests[name] = tensor_digest(name, dtype, shape, memoryview(data)[start + begin:start + end])
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


def _mul32(torch: Any, x: Any, c: int) -> Any:
    # (x * c) mod 2^32 without int64 overflow: split c into 16-bit halves
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _MASK32


def _fmix32(torch: Any, x: Any) -> Any:
    x = x ^ (x >> 16)
    x = _mul32(torch, x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(torch, x, 0xC2B2AE35)
    return x ^ (x >> 16)


def sketch_slots(torch: Any, seed: int, name: str, start: int, stop: int, k: int, device: Any) -> Any:
    """Slot of each coordinate in [start, stop) of tensor ``name``: bucket b ∈ [0, k) with sign +
    is slot b, with sign − slot k + b (int64, on ``device``)."""
    a, b = _name_salt(seed, name)
    index = torch.arange(start, stop, dtype=torch.int64, device=device)
    h = _fmix32(torch, _fmix32(torch, (index & _MASK32) ^ a) ^ ((index >> 32) + b) & _MASK32)
    bucket = h & (k - 1)
    return bucket + k * (h >> 31)


def _acc_dtype(flat: Any) -> Any:
    import torch

    return torch.float32 if flat.device.type == "mps" else torch.float64


def _slot_dtype(torch: Any, k: int) -> Any:
    return torch.int16 if 2 * k <= 32767 else torch.int32


def _scatter(torch: Any, slots: Any, values: Any, size: int) -> Any:
    """Sum ``values`` into ``size`` slots in the accumulation dtype. On the CPU ``bincount``
    (deterministic); elsewhere ``index_add_``, whose summation order may vary (within the stated
    tolerance), so deterministic-algorithms mode is lifted for this one call."""
    dtype = _acc_dtype(values)
    if values.device.type == "cpu":
        return torch.bincount(slots, weights=values.to(dtype), minlength=size)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        return torch.zeros(size, dtype=dtype, device=values.device).index_add_(0, slots.long(), values.to(dtype))
    finally:
        torch.use_deterministic_algorithms(was)


class CountSketch:
    """A seeded count-sketch with k buckets: bucket and sign of each coordinate come from an
    integer hash of (seed, tensor name, index), so the sketch is the same on any device up to
    floating-point summation order. Distances between sketches estimate L2 distances between the
    weights (relative error about 1/√k).

    ``cache_limit`` (elements): below it the slots are computed once and kept (2 bytes per
    coordinate for k ≤ 16383, on the tensors' device); above it they are recomputed in chunks at
    each call.
    """

    def __init__(self, seed: int, k: int = SKETCH_K, cache_limit: int = 1 << 25) -> None:
        if k < 2 or k & (k - 1):
            raise ConfigurationError("the sketch size k must be a power of two ≥ 2")
        self.seed, self.k, self.cache_limit = seed, k, cache_limit
        self._cache: dict[tuple[str, int, str], Any] = {}  # slots per tensor (a list while being built)

    def __call__(self, tensors: Mapping[str, Any]) -> np.ndarray:
        """The sketch (float64, k values) of the named tensors, summed over tensors."""
        import torch

        total: Any = None
        cache_ok = sum(t.numel() for t in tensors.values()) <= self.cache_limit
        with torch.no_grad():
            for name, tensor in tensors.items():
                flat = tensor.detach().reshape(-1)
                n = flat.numel()
                if n == 0:
                    continue
                key = (name, n, str(flat.device))
                slots = self._cache.get(key) if cache_ok else None
                if slots is None:
                    acc = torch.zeros(2 * self.k, dtype=_acc_dtype(flat), device=flat.device)
                    for lo in range(0, n, _CHUNK):
                        hi = min(lo + _CHUNK, n)
                        chunk_slots = sketch_slots(torch, self.seed, name, lo, hi, self.k, flat.device)
                        acc += _scatter(torch, chunk_slots, flat[lo:hi], 2 * self.k)
                        if cache_ok:
                            self._cache.setdefault(key, []).append(chunk_slots.to(_slot_dtype(torch, self.k)))
                    if cache_ok:
                        self._cache[key] = torch.cat(self._cache[key])
                else:
                    acc = _scatter(torch, slots, flat, 2 * self.k)
                signed = acc[: self.k] - acc[self.k:]
                total = signed if total is None else total + signed.to(total.device)
        if total is None:
            return np.zeros(self.k)
        return total.double().cpu().numpy()


BATCH_DOMAIN = b"training-ledger/batch/v1\x00"


def batch_digest(batch: Any) -> bytes:
    """Digest of a batch: its leaves in pytree order (tensors digested like weights under their
    leaf index, other leaves as deterministic CBOR), then the list of leaf digests."""
    from torch.utils._pytree import tree_flatten

    from ledger._encoding import encode_body

    leaves, _ = tree_flatten(batch)
    h = hashlib.sha256(BATCH_DOMAIN + struct.pack(">Q", len(leaves)))
    for index, leaf in enumerate(leaves):
        if hasattr(leaf, "detach") and hasattr(leaf, "dtype"):
            h.update(tensor_digest(str(index), safetensors_dtype(leaf), tuple(leaf.shape), tensor_bytes(leaf)))
        else:
            h.update(hashlib.sha256(encode_body({"leaf": leaf})).digest())
    return h.digest()
