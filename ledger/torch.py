"""The torch adapter: everything in ``ledger`` that needs PyTorch, in one module.

It imports torch at its top, so ``import ledger.torch`` needs the ``torch`` extra
(``pip install 'training-ledger[torch]'``); the format modules never import it. What lives here:
fingerprints of live tensors (digests, the count-sketch on any device, batch digests), the training
state of a checkpoint (snapshot, write, restore, RNG states), what genesis records about the
machine and the model, and the functions that run step ``s`` of a recipe (:func:`run_step`,
:func:`continue_step`).
The byte-level definitions are in docs/FORMAT.md §10–§11 and in the torch-free modules
(``ledger._fingerprint``, ``ledger._state``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import random
import re
import shutil
import stat
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ledger._device import CudaBackend, Landing, lane_for
from ledger._encoding import encode_body
from ledger._fingerprint import (
    BATCH_DOMAIN,
    SKETCH_K,
    TORCH_TO_SAFETENSORS,
    _name_salt,
    check_sketch_k,
    tensor_digest,
)
from ledger._parts import fsync_path
from ledger._recipe import step_seed
from ledger._state import FILES, StateDigests, read_meta, state_digest
from ledger.errors import ConfigurationError, FormatError

# ----------------------------------------------------------------------------- tensor fingerprints


def canonical_state(model_or_state: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors a model is fingerprinted by: its ``state_dict`` (parameters and persistent
    buffers), tied weights kept once under the lexicographically first name as
    ``safetensors.torch.save_model`` keeps them. Returns (tensors, aliases: dropped → kept)."""
    from safetensors.torch import _remove_duplicate_names

    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else dict(model_or_state)
    state = {name: tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}
    aliases: dict[str, str] = {}
    for kept, dropped in _remove_duplicate_names(state).items():
        for name in dropped:
            aliases[name] = kept
            del state[name]
    return state, aliases


def safetensors_dtype(tensor: torch.Tensor) -> str:
    """The safetensors dtype string of a torch tensor."""
    name = str(tensor.dtype).removeprefix("torch.")
    try:
        return TORCH_TO_SAFETENSORS[name]
    except KeyError:
        raise ConfigurationError(f"tensors of dtype {name} cannot be fingerprinted") from None


@functools.cache
def _numpy_safe_dtypes() -> frozenset[torch.dtype]:
    return frozenset({torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                      torch.uint8})


def in_memory(tensor: torch.Tensor) -> bool:
    """Whether a tensor's elements are plain bytes in CPU memory that :func:`host_bytes` can read: a
    contiguous, non-empty plain tensor (not a subclass such as a masked or wrapper tensor, not a
    zero tensor, no pending negation or conjugation) whose storage holds all of it."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type == "cpu" \
        and tensor.is_contiguous() and tensor.numel() > 0 and not tensor._is_zerotensor() \
        and not tensor.is_neg() and not tensor.is_conj() and tensor.data_ptr() != 0 \
        and tensor.untyped_storage().nbytes() >= (tensor.storage_offset() + tensor.numel()) * tensor.element_size()


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The memory of a tensor :func:`in_memory` accepts, as bytes read in place, without torch's
    numpy bridge: ``Tensor.numpy()`` marks the storage never resizable again, so a module that
    resizes its buffer later (a quantisation observer) would fail in its forward. The view keeps
    the storage object alive, not its allocation: a ``resize_`` may free or move the memory under
    it, so whoever holds the view reads it only while the tensor keeps the address and size it had
    (``hooks._norms.Norms.current``)."""
    if not in_memory(tensor):
        raise ValueError("host_bytes takes a contiguous, non-empty plain CPU tensor whose storage holds it")
    raw = (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())
    raw._tensor = tensor  # type: ignore[attr-defined]  # the storage lives as long as the view
    return memoryview(raw).cast("B")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Little-endian contiguous bytes of a tensor, on the CPU (a copy, or the tensor's own memory
    read in place: :func:`host_bytes`; never changes the live tensor)."""
    if _zero_copy(tensor):  # memoryview cannot cast a (0, n) array: an empty tensor takes the path below
        return host_bytes(tensor.detach())  # zero-copy fast path (no torch ops)
    flat = tensor.detach().resolve_conj().resolve_neg().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if not flat.numel():
        return np.zeros(0, np.uint8).data
    if not in_memory(flat):
        raise ConfigurationError(f"a {type(tensor).__name__} tensor (a subclass, or a zero tensor) cannot be "
                                 "fingerprinted: give plain tensors")
    if sys.byteorder != "little" and flat.element_size() > 1:
        same_size = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]  # numpy has no bf16
        return memoryview(flat.view(same_size).clone().numpy().byteswap().view(np.uint8))
    return host_bytes(flat)


def torch_digests(tensors: Mapping[str, torch.Tensor], scheme: str = "tensor/v1", *,
                  workers: int = 1) -> dict[str, bytes]:
    """Tensor digests of named torch tensors (copied to the CPU one at a time), in the digest scheme
    a genesis states (``tensor/v1``, or ``tensor-blocked/v1``: docs/FORMAT.md §10.1). ``workers`` > 1
    hashes the CPU tensors whose bytes need no copy in that many threads (largest first; hashlib
    releases the GIL), so memory stays one copied tensor whatever the thread count."""
    from ledger._blocked import digest_function

    digest = digest_function(scheme)

    def one(name: str) -> bytes:
        t = tensors[name]
        return digest(name, safetensors_dtype(t), tuple(t.shape), tensor_bytes(t))

    shared = [n for n, t in tensors.items() if _zero_copy(t)] if workers > 1 and scheme == "tensor/v1" else []
    out: dict[str, bytes] = {}
    if len(shared) > 1:
        from concurrent.futures import ThreadPoolExecutor

        shared.sort(key=lambda n: -tensors[n].nbytes)
        with ThreadPoolExecutor(min(workers, len(shared)), thread_name_prefix="ledger-hash") as pool:
            out.update(zip(shared, pool.map(one, shared), strict=True))
    out.update((name, one(name)) for name in tensors if name not in out)
    return {name: out[name] for name in tensors}


def _zero_copy(tensor: torch.Tensor) -> bool:
    """Whether :func:`tensor_bytes` reads the tensor's own CPU memory (no copy)."""
    return tensor.dtype in _numpy_safe_dtypes() and sys.byteorder == "little" and in_memory(tensor)


def batch_digest(batch: Any) -> bytes:
    """Digest of a batch: its leaves in pytree order (tensors digested like weights under their
    leaf index, other leaves as deterministic CBOR), then the list of leaf digests."""
    return BatchLeaves(batch, copy_below=0).digest()


class CopyAllowance:
    """How many bytes of batch copies may wait for the writer thread at once (a recorder's queue
    holds up to ``queue_size`` entries): beyond it, batches are digested on the training thread."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False when that would pass the limit."""
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give(self, size: int) -> None:
        """Return ``size`` reserved bytes."""
        with self._lock:
            self.held -= size


class BatchLeaves:
    """A batch taken apart on the training thread so that its digest can be finished on another
    thread (:meth:`digest`, equal to :func:`batch_digest`): while the batch's tensors add up to fewer
    than ``copy_below`` bytes and ``allowance`` (if any) has room for them, they are copied (a
    private CPU copy the caller cannot change; from a CUDA device asynchronously, into pinned memory,
    waited for in :meth:`digest`), else each tensor leaf is digested here. A leaf the digest refuses
    (its dtype) is refused here, on the caller's thread."""

    __slots__ = ("_allowance", "_count", "_digest", "_held", "_leaves", "_ready")

    def __init__(self, batch: Any, copy_below: int = 1 << 20, allowance: CopyAllowance | None = None) -> None:
        if type(batch) in (tuple, list) and all(type(leaf) is torch.Tensor for leaf in batch):
            leaves = list(batch)  # what tree_flatten gives for them, without its per-node dispatch
        else:
            from torch.utils._pytree import tree_flatten

            leaves, _ = tree_flatten(batch)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        for tensor in tensors:
            safetensors_dtype(tensor)  # refuses what cannot be fingerprinted, now
        size = sum(t.nbytes for t in tensors)
        copy = size < copy_below and (allowance is None or allowance.take(size))
        self._allowance, self._held = allowance, size if copy and allowance is not None else 0
        self._count = len(leaves)
        self._digest: bytes | None = None
        self._ready: list[Any] = []  # a CUDA event per device copied from
        out: list[Any] = []
        for index, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                out.append(hashlib.sha256(encode_body({"leaf": leaf})).digest())
            elif copy:
                out.append(self._copy(leaf.detach().resolve_conj().resolve_neg()))
            else:
                out.append(tensor_digest(str(index), safetensors_dtype(leaf), tuple(leaf.shape), tensor_bytes(leaf)))
        self._leaves = out

    def _copy(self, leaf: torch.Tensor) -> torch.Tensor:
        if leaf.device.type == "cpu":
            return leaf.clone()
        if leaf.device.type != "cuda":  # other accelerators: a copy that has landed when it returns
            return leaf.cpu()
        host = CudaBackend(leaf.device).to_host(leaf)  # pinned, not waited for
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record(torch.cuda.current_stream(leaf.device))
        self._ready.append(done)
        return host

    def digest(self) -> bytes:
        """The batch digest (any thread; waits for an asynchronous copy; the copies are freed)."""
        if self._digest is not None:
            return self._digest
        for done in self._ready:
            done.synchronize()
        h = hashlib.sha256(BATCH_DOMAIN + self._count.to_bytes(8, "big"))
        for index, leaf in enumerate(self._leaves):
            h.update(leaf if isinstance(leaf, bytes) else
                     tensor_digest(str(index), safetensors_dtype(leaf), tuple(leaf.shape), tensor_bytes(leaf)))
        self._leaves, self._digest = [], h.digest()
        if self._allowance is not None and self._held:
            self._allowance.give(self._held)
            self._held = 0
        return self._digest


# ----------------------------------------------------------------------------- count-sketch on any device
# coordinates per sketch pass (powers of two ≤ 2³²; 32 bytes of scratch each): on the CPU a pass stays in
# cache; on an accelerator a pass is ~35 kernel launches, so passes are longer there
_CHUNK = 1 << 18
_DEVICE_CHUNK = 1 << 21
_FMIX = ((16, 0x85EBCA6B), (13, 0xC2B2AE35))  # ledger._fingerprint._fmix32: its multiplying steps


def _i32(value: int) -> int:
    """The int32 whose bits are ``value`` mod 2³²."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


def _mix_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """The two multiplying steps of fmix32 on int32 bit patterns, in place: products wrap mod 2³²
    and the shifts are made logical by masking the sign bits they bring in (``tmp``: scratch)."""
    for shift, factor in _FMIX:
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp.bitwise_and_((1 << (32 - shift)) - 1)).mul_(_i32(factor))


def _slots_(x: torch.Tensor, tmp: torch.Tensor, low: int | torch.Tensor, high: int | torch.Tensor,
            k: int) -> torch.Tensor:
    """``ledger._fingerprint.sketch_hash`` in int32: ``x`` holds the low 32 bits of each index and
    becomes its slot; ``low`` is the name's first salt, ``high`` the index's high word plus the
    second salt (numbers or int32 tensors like x, as int32 bits); ``tmp``: scratch of x's size."""
    x.bitwise_xor_(low)
    _mix_(x, tmp)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF)).bitwise_xor_(high)
    _mix_(x, tmp)
    # fmix32's last step (x ^= x >>> 16) makes the bucket bits and leaves the sign bit 31 as it is
    torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF).bitwise_xor_(x).bitwise_and_(k - 1)
    return x.bitwise_right_shift_(31).bitwise_and_(k).bitwise_or_(tmp)


def sketch_slots(seed: int, name: str, start: int, stop: int, k: int, device: Any) -> torch.Tensor:
    """Slot of each coordinate in [start, stop) of tensor ``name`` (int64 on ``device``): bucket b
    with sign + is slot b, with sign − slot k + b (docs/FORMAT.md §10)."""
    a, b = _name_salt(seed, name)
    out = torch.empty(stop - start, dtype=torch.int64, device=device)
    lo = start
    while lo < stop:  # the high word of the index is constant between multiples of 2³²
        hi = min(stop, ((lo >> 32) + 1) << 32)
        x = torch.arange(hi - lo, dtype=torch.int32, device=device).add_(_i32(lo))
        out[lo - start:hi - start] = _slots_(x, torch.empty_like(x), _i32(a), _i32((lo >> 32) + b), k)
        lo = hi
    return out


def _acc_dtype(flat: torch.Tensor) -> torch.dtype:
    return torch.float32 if flat.device.type == "mps" else torch.float64


def _scatter(slots: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """Sum ``values`` into ``size`` slots (int32 or int64) in the accumulation dtype. On the CPU
    ``bincount`` (deterministic); elsewhere ``index_add_``, whose summation order may vary (within
    the stated tolerance), so deterministic-algorithms mode is lifted for this one call."""
    dtype = _acc_dtype(values)
    if values.device.type == "cpu":
        return torch.bincount(slots, weights=values.to(dtype), minlength=size)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        return torch.zeros(size, dtype=dtype, device=values.device).index_add_(0, slots, values.to(dtype))
    finally:
        torch.use_deterministic_algorithms(was)


def _pass_size(device: torch.device) -> int:
    return _CHUNK if device.type == "cpu" else _DEVICE_CHUNK


@dataclass(frozen=True, slots=True)
class _Pass:
    """Up to a pass size of coordinates sketched together: pieces (tensor name, start, stop) of one or
    more tensors, and each piece's int32 (index − position in the pass, first salt, high word plus
    second salt): as numbers for one piece; for several, on the device as the pieces' positions in
    the pass and a (3, pieces) tensor of the steps from one piece's numbers to the next (int32,
    mod 2³²), from which a cumulative sum spreads them over the pass."""

    pieces: tuple[tuple[str, int, int], ...]
    salts: tuple[int, int, int]
    spread: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def size(self) -> int:
        return sum(stop - start for _, start, stop in self.pieces)


def _passes(seed: int, spans: Sequence[tuple[str, int, int]], device: torch.device, chunk: int) -> tuple[_Pass, ...]:
    """The passes over these pieces (name, start, stop) of flattened tensors (coordinates [start, stop)
    of each): each cut at multiples of ``chunk`` (so no piece crosses a multiple of 2³²); whole chunks
    alone, the shorter rests (at most two per piece: before the first multiple, after the last) packed."""
    groups: list[list[tuple[str, int, int]]] = []
    packed: list[list[tuple[str, int, int]]] = []
    room = 0
    for name, start, stop in spans:
        first = min(-(-start // chunk) * chunk, stop)
        last = max(stop - stop % chunk, first)
        groups.extend([(name, lo, lo + chunk)] for lo in range(first, last, chunk))
        for lo, hi in ((start, first), (last, stop)):
            if hi > lo:
                if hi - lo > room:
                    packed.append([])
                    room = chunk
                packed[-1].append((name, lo, hi))
                room -= hi - lo
    out = []
    for pieces in groups + packed:
        salts, positions = [], [0]
        for name, start, stop in pieces:
            a, b = _name_salt(seed, name)
            salts.append((_i32(start - positions[-1]), _i32(a), _i32((start >> 32) + b)))
            positions.append(positions[-1] + stop - start)
        spread = None
        if len(pieces) > 1:
            steps = [[_i32(s - r) for s, r in zip(now, before, strict=True)]
                     for now, before in zip(salts, [(0, 0, 0), *salts], strict=False)]
            spread = (torch.tensor(positions[:-1], dtype=torch.int64, device=device),
                      torch.tensor(steps, dtype=torch.int32, device=device).T.contiguous())
        out.append(_Pass(tuple(pieces), salts[0], spread))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Plan:
    """The passes over the tensors of one device and the scratch they reuse (at most 32 bytes per
    coordinate of the widest pass)."""

    spans: tuple[int, list[tuple[str, int, int]]]  # (pass size, each tensor's name, first and end index)
    passes: tuple[_Pass, ...]
    base: torch.Tensor  # 0, 1, 2, … (int32)
    x: torch.Tensor  # int32 scratch
    tmp: torch.Tensor  # int32 scratch
    packed: torch.Tensor  # (3, width) int32 scratch for the numbers spread over packed passes
    values: torch.Tensor  # the pass's values in the accumulation dtype

    @staticmethod
    def of(seed: int, spans: list[tuple[str, int, int]], device: torch.device) -> _Plan:
        """The plan of pieces (name, start, stop) of flattened tensors on ``device``."""
        chunk = _pass_size(device)
        passes = _passes(seed, spans, device, chunk)
        width = max(p.size for p in passes)
        base = torch.arange(width, dtype=torch.int32, device=device)
        packed = torch.empty((3, width if any(p.spread is not None for p in passes) else 0), dtype=torch.int32,
                             device=device)
        values = torch.empty(width, dtype=_acc_dtype(base), device=device)
        return _Plan((chunk, spans), passes, base, torch.empty_like(base), torch.empty_like(base), packed, values)


@dataclass(frozen=True, slots=True)
class PendingSketch:
    """A sketch launched by :meth:`CountSketch.measure`; :meth:`value` waits for it and returns it."""

    k: int
    landings: tuple[Landing, ...]  # one per device: its 2k slot sums

    def value(self) -> np.ndarray:
        """The sketch (float64, k values)."""
        acc = torch.zeros(2 * self.k, dtype=torch.float64)
        for landing in self.landings:
            acc += landing.value()[0].double()
        return (acc[:self.k] - acc[self.k:]).numpy()


class CountSketch:
    """A seeded count-sketch with k buckets on torch tensors (any device): bucket and sign of each
    coordinate come from an integer hash of (seed, tensor name, index), so the sketch is the same on
    any device up to floating-point summation order, and equals ``ledger._weights.NumpySketch`` on
    the same values. Distances between sketches estimate L2 distances (relative error about 1/√k).

    Nothing is kept per coordinate: buckets and signs are recomputed at each call, in passes of
    2¹⁸ coordinates on the CPU and 2²¹ on accelerators (the rests of tensors share passes), whose
    scratch takes at most 32 bytes per coordinate of a pass (8 MiB on the CPU, 64 MiB on an
    accelerator) whatever the model size; it is kept between calls, with the plan of the passes
    (a few numbers per tensor). A tensor may be a piece of a larger one (a rank's shard): ``starts``
    gives the flat index, in the larger tensor, of its first element, and the sketch of the pieces
    summed is the larger tensor's. Tensors named in ``skip`` (genesis ``fingerprints.sketch_skips``)
    are left out.
    """

    def __init__(self, seed: int, k: int = SKETCH_K, skip: Iterable[str] = ()) -> None:
        check_sketch_k(k)
        if k > 1 << 30:
            raise ConfigurationError("the sketch size k must be at most 2**30")
        self.seed, self.k, self.skip = seed, k, frozenset(skip)
        self._plans: dict[torch.device, _Plan] = {}  # per device: the last one
        self._lock = threading.Lock()

    def __call__(self, tensors: Mapping[str, torch.Tensor], starts: Mapping[str, int] | None = None) -> np.ndarray:
        """The sketch (float64, k values) of the named tensors, summed over tensors; ``starts``: the
        flat index of a tensor's first element in the tensor it is a piece of (default 0)."""
        return self.measure(tensors, starts).value()

    def measure(self, tensors: Mapping[str, torch.Tensor], starts: Mapping[str, int] | None = None) -> PendingSketch:
        """Launch the sketch of the named tensors without waiting for the device (on CUDA on a side
        stream: ``ledger._device``); the result's ``value()`` is what calling the sketch returns."""
        groups: dict[torch.device, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if tensor.numel() and name not in self.skip:
                groups.setdefault(tensor.device, {})[name] = tensor.detach().reshape(-1)
        first = starts or {}
        return PendingSketch(self.k, tuple(
            lane_for(device).launch(functools.partial(self._sketch, flats, first, device), list(flats.values()))
            for device, flats in groups.items()))

    def _sketch(self, flats: Mapping[str, torch.Tensor], starts: Mapping[str, int],
                device: torch.device) -> tuple[torch.Tensor]:
        """The 2k slot sums of flat tensors on one device (on that device)."""
        origin = {name: starts.get(name, 0) for name in flats}
        spans = [(name, origin[name], origin[name] + flat.numel()) for name, flat in flats.items()]
        with self._lock:  # the scratch is shared by the calls
            plan = self._plans.get(device)
            if plan is None or plan.spans != (_pass_size(device), spans):
                plan = self._plans[device] = _Plan.of(self.seed, spans, device)
            acc = torch.zeros(2 * self.k, dtype=plan.values.dtype, device=device)
            for p in plan.passes:
                n = p.size
                x, tmp, values = plan.x[:n], plan.tmp[:n], plan.values[:n]
                torch.cat([flats[name][start - origin[name]:stop - origin[name]] for name, start, stop in p.pieces],
                          out=values)
                if p.spread is None:
                    index, low, high = p.salts
                    slots = _slots_(torch.add(plan.base[:n], index, out=x), tmp, low, high, self.k)
                else:
                    rows = plan.packed[:, :n].zero_().index_copy_(1, *p.spread).cumsum_(1)
                    slots = _slots_(torch.add(plan.base[:n], rows[0], out=x), tmp, rows[1], rows[2], self.k)
                acc += _scatter(slots, values, 2 * self.k)
        return (acc,)


# ----------------------------------------------------------------------------- training state (checkpoints)
@dataclass(frozen=True, slots=True)
class Snapshot:
    """A training state copied off the live objects (CPU tensors), ready to be written."""

    step: int
    model: dict[str, torch.Tensor]
    aliases: dict[str, str]
    optimizer_tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _plain(value: Any) -> Any:
    """Tensors → lists/numbers for CBOR; containers recursively; tuples → lists (values must
    round-trip into a checkpoint, unlike genesis's :func:`_describe`)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), python and numpy."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": np.asarray(np_keys, dtype=np.uint32), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], np.asarray(npst["keys"], dtype=np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in state["cuda"]])


def optimizers_of(optimizer: Any) -> list[Any]:
    """One optimizer, or each of a list or tuple of them, framework wrappers unwrapped
    (:func:`unwrap_optimizer`). Schedulers pass through unchanged."""
    return [unwrap_optimizer(o) for o in (optimizer if isinstance(optimizer, (list, tuple)) else [optimizer])]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper: an object that passes for a
    ``torch.optim.Optimizer`` (``isinstance`` holds) without being an initialised one (it has no
    step-hook registry of its own) and wraps one in ``optimizer`` (accelerate's
    ``AcceleratedOptimizer``) or ``_optimizer`` (Lightning's ``LightningOptimizer``). Their ``step``
    calls the wrapped optimizer's, whose step hooks the recorder registers. Anything else as is."""
    for _ in range(8):  # wrappers of wrappers, bounded
        if not isinstance(optimizer, torch.optim.Optimizer) or "_optimizer_step_pre_hooks" in vars(optimizer):
            return optimizer
        inner = vars(optimizer).get("_optimizer", vars(optimizer).get("optimizer"))
        if not isinstance(inner, torch.optim.Optimizer):
            return optimizer
        optimizer = inner
    return optimizer


def snapshot(step: int, model: Any, optimizer: Any, scheduler: Any = None) -> Snapshot:
    """Copy the full training state to CPU tensors and plain values (on the calling thread).
    ``optimizer`` (and ``scheduler``) may be a list: with several optimizers, state tensors are named
    ``state/<k>.<param index>/<key>`` for the k-th, and ``param_groups`` holds all their groups in
    order, ``optimizer_groups`` how many each has (docs/FORMAT.md §11)."""
    tensors, aliases = canonical_state(model)
    model_copy = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    optimizers = optimizers_of(optimizer)
    several = len(optimizers) > 1
    opt_tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    groups: list[Any] = []
    for k, opt in enumerate(optimizers):
        opt_state = opt.state_dict()
        for index, values in opt_state["state"].items():
            where = f"{k}.{index}" if several else f"{index}"
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors[f"state/{where}/{key}"] = value.detach().to("cpu", copy=True).contiguous()
                else:
                    scalars[f"{where}/{key}"] = _plain(value)
        groups += _plain(opt_state["param_groups"])
    meta: dict[str, Any] = {
        "step": step, "param_groups": groups, "optimizer_scalars": scalars,
        "optimizer_class": type(optimizers[0]).__name__, "aliases": aliases,
        "scheduler": None if scheduler is None else [_plain(s.state_dict()) for s in scheduler]
        if isinstance(scheduler, (list, tuple)) else _plain(scheduler.state_dict()), "rng": rng_state()}
    if several:
        meta["optimizer_groups"] = [len(opt.param_groups) for opt in optimizers]
        meta["optimizer_classes"] = [type(opt).__name__ for opt in optimizers]
    return Snapshot(step, model_copy, aliases, opt_tensors, meta)


def snapshot_digests(snap: Snapshot, meta: bytes | None = None) -> StateDigests:
    """The digests a snapshot's checkpoint files will have (``meta``: its encoded state.cbor)."""
    from ledger._fingerprint import model_digest

    model_d = torch_digests(snap.model)
    md, od = model_digest(model_d), model_digest(torch_digests(snap.optimizer_tensors))
    meta_d = hashlib.sha256(encode_body(snap.meta) if meta is None else meta).digest()
    return StateDigests(model_d, md, od, meta_d, state_digest(md, od, meta_d))


TEMPORARY = re.compile(r"^\.tmp-(?:([0-9a-f]{8})-)?([0-9a-f]{16})-([0-9]+)$")
_writing: set[str] = set()  # temporary directories a thread of this process is writing now
_writing_lock = threading.Lock()


def temporary_name(digest: bytes, tag: str = "") -> str:
    """The temporary directory a checkpoint is written in before its rename:
    ``.tmp-[<tag>-]<first 16 hex of the state digest>-<pid>`` (``tag``: 8 hex digits naming the run, so
    a clean-up in a checkpoint root shared by several runs removes only its own; :data:`TEMPORARY`)."""
    if tag and not re.fullmatch(r"[0-9a-f]{8}", tag):
        raise ConfigurationError(f"a checkpoint's temporary tag is 8 hex digits, not {tag!r}")
    return f".tmp-{tag + '-' if tag else ''}{digest.hex()[:16]}-{os.getpid()}"


def being_written(path: Path) -> bool:
    """True while a thread of this process writes the temporary checkpoint directory ``path``."""
    with _writing_lock:
        return str(Path(path).absolute()) in _writing


def place_checkpoint(snap: Snapshot, root: Path, *, tag: str = "") -> tuple[Path, StateDigests, bool]:
    """Write a snapshot durably under ``root/<state digest>/``; return the directory, its digests and
    whether this call created it (False: a real directory of that name was already there — the same
    state, content-addressed — and is used as it is).

    The files are written to a temporary directory (:func:`temporary_name`), fsynced and renamed into
    place, so a checkpoint directory either is complete or does not exist; on failure the temporary
    directory is removed. A ``<hex>`` name that exists as anything but a real directory (a symlink, a
    file) is refused (:class:`FormatError`), never used or replaced."""
    from safetensors.torch import save_file

    meta = encode_body(snap.meta)
    digests = snapshot_digests(snap, meta)
    final = root / digests.state_digest.hex()
    if _existing(final):
        return final, digests, False
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / temporary_name(digests.state_digest, tag)
    key = str(tmp.absolute())
    with _writing_lock:
        _writing.add(key)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover of the same state
        tmp.mkdir()
        save_file(snap.model, str(tmp / FILES[0]))
        save_file(snap.optimizer_tensors, str(tmp / FILES[1]))
        (tmp / FILES[2]).write_bytes(meta)
        for name in FILES:
            fsync_path(tmp / name)
        fsync_path(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _existing(final):  # another run wrote the same state meanwhile: use it
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final, digests, False
    except BaseException:
        if not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with _writing_lock:
            _writing.discard(key)
    fsync_path(root)
    return final, digests, True


def _existing(final: Path) -> bool:
    """True when ``final`` is a real directory (lstat), False when absent; refuses anything else."""
    try:
        mode = os.lstat(final).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        return True
    raise FormatError(f"{final} exists but is not a directory (a symlink or a file); refusing to use or replace it")


def write_checkpoint(snap: Snapshot, root: Path, *, tag: str = "") -> tuple[Path, StateDigests]:
    """Write a snapshot durably under ``root/<state digest>/`` and return its digests
    (:func:`place_checkpoint`, which also says whether the directory was created)."""
    directory, digests, _ = place_checkpoint(snap, root, tag=tag)
    return directory, digests


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU; nothing unpickled)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def restore(directory: Path, model: Any, optimizer: Any = None, scheduler: Any = None, *,
            rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint into live objects (safetensors and CBOR only; nothing is unpickled).
    Returns the decoded metadata."""
    meta = read_meta(directory)
    weights = load_tensors(directory / FILES[0])
    for alias, kept in dict(meta.get("aliases", {})).items():
        weights[alias] = weights[kept]
    current = model.state_dict()
    differ = [f"{name} {tuple(weights[name].shape)} vs {tuple(current[name].shape)}" for name in current
              if name in weights and tuple(weights[name].shape) != tuple(current[name].shape)]
    if differ:
        raise ConfigurationError(f"checkpoint {directory.name} does not fit this model: tensor shapes differ "
                                 f"({', '.join(differ[:3])}, checkpoint vs model); build the model the run recorded")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a dtype or size torch refuses: the model is not the recorded one
        raise ConfigurationError(f"checkpoint {directory.name} does not fit this model: "
                                 f"{str(exc).splitlines()[-1].strip()}") from exc
    if missing or unexpected:
        raise ConfigurationError(f"checkpoint {directory.name} does not fit this model "
                                 f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    if optimizer is not None:
        optimizers = optimizers_of(optimizer)
        counts = list(meta.get("optimizer_groups", [len(meta["param_groups"])]))
        if len(counts) != len(optimizers):
            raise ConfigurationError(f"checkpoint {directory.name} holds {len(counts)} optimizer(s), "
                                     f"{len(optimizers)} given")
        states: list[dict[int, dict[str, Any]]] = [{} for _ in optimizers]
        entries = [*load_tensors(directory / FILES[1]).items(), *dict(meta["optimizer_scalars"]).items()]
        for key, value in entries:
            where, name = key.removeprefix("state/").split("/", 1)
            k, _, index = where.rpartition(".")
            states[int(k) if k else 0].setdefault(int(index), {})[name] = value
        groups = [dict(g) for g in meta["param_groups"]]
        for group in groups:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        start = 0
        for opt, state, count in zip(optimizers, states, counts, strict=True):
            try:
                opt.load_state_dict({"state": state, "param_groups": groups[start:start + count]})
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ConfigurationError(f"checkpoint {directory.name}'s optimizer state does not fit this "
                                         f"optimizer ({str(exc).splitlines()[0]}); build the optimizer the run "
                                         "recorded") from exc
            start += count
    if scheduler is not None and meta.get("scheduler") is not None:
        saved = meta["scheduler"]
        for sched, sched_state in zip(optimizers_of(scheduler), saved if isinstance(saved, list) else [saved],
                                      strict=True):
            sched.load_state_dict(dict(sched_state))
    if rng:
        set_rng_state(meta["rng"])
    return meta


# ----------------------------------------------------------------------------- what genesis records
def environment(device: str) -> dict[str, Any]:
    """Python, torch, numpy and BLAS versions, CPU capability, thread count, device."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device,
        "mkl": bool(torch.backends.mkl.is_available()),  # type: ignore[no-untyped-call]
        "mkldnn": bool(torch.backends.mkldnn.is_available()),  # type: ignore[no-untyped-call]
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    config = torch.__config__.show()
    env["blas"] = {key: match.group(1) for key in ("BLAS_INFO", "LAPACK_INFO")
                   if (match := re.search(rf"{key}=([^,\s]+)", config))}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env


def buffer_names(model: Any, names: Iterable[str]) -> list[str]:
    """Of ``names`` (fingerprinted tensors of ``model``), those that are not parameters: its buffers,
    sorted. No optimizer bounds them, so the recorder leaves them out of its count-sketches (genesis
    ``fingerprints.sketch_skips``): a moved buffer (BatchNorm statistics) would leave every sketch
    interval without a bound, a buffer holding ±inf (an additive causal mask) every slot non-finite."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return sorted(name for name in names if name not in params)


def architecture(model: Any, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, Any]:
    """Module classes, and names, shapes and dtypes of the fingerprinted tensors."""
    buffers = set(buffer_names(model, tensors))
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "modules": [[name, type(module).__name__] for name, module in model.named_modules()],
        "tensors": [{"name": name, "shape": list(t.shape), "dtype": safetensors_dtype(t),
                     "kind": "buffer" if name in buffers else "parameter"} for name, t in tensors.items()],
        "aliases": dict(aliases),
        "parameters": int(sum(t.numel() for name, t in tensors.items() if name not in buffers)),
    }


def optimizer_groups(optimizer: Any, names_by_id: Mapping[int, str]) -> list[dict[str, Any]]:
    """Each param group's hyperparameters and the names of its tensors."""
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: _describe(v) for k, v in group.items() if k != "params"}
        hyper["tensors"] = [names_by_id.get(id(p), f"<unnamed {i}>") for i, p in enumerate(group["params"])]
        groups.append(hyper)
    return groups


def _describe(value: Any) -> Any:
    """A hyperparameter for genesis: numbers, text and lists as they are, anything else its repr."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


# ----------------------------------------------------------------------------- running a recipe
def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python's random and numpy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def deterministic(seed: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Make torch deterministic: deterministic algorithms, a fixed CPU thread count (default:
    the current one) and, when ``seed`` is given, every RNG seeded. Returns the settings, which
    genesis records and replay re-applies."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if torch.backends.cudnn.is_available():  # type: ignore[no-untyped-call]
        torch.backends.cudnn.benchmark = False
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if seed is not None:
        seed_everything(seed)
    return {"deterministic_algorithms": True, "threads": threads}


def build_scheduler(recipe: Any, optimizer: Any) -> Any:
    """The recipe's scheduler, or None when it defines none."""
    builder = getattr(recipe, "build_scheduler", None)
    return builder(optimizer) if builder is not None else None


#: RNG disciplines a run declares in genesis ``determinism["rng"]`` (docs/FORMAT.md §12), which replay
#: follows: every RNG reseeded before each step (:func:`run_step`, what ``ledger.hooks.train`` does), or
#: one stream continued from the checkpoint's RNG state (:func:`continue_step`, a hand-written loop).
RESEED_PER_STEP = "reseed-per-step/v1"
STREAM = "stream"


def continue_step(recipe: Any, model: Any, optimizer: Any, scheduler: Any,
                  step: int) -> tuple[dict[str, float], Any]:
    """Run optimizer step ``step`` of a recipe on the RNG streams as they are (nothing reseeded):
    take ``recipe.batch(step)``, call ``recipe.train_step``, then advance the scheduler — what a
    hand-written loop over a recipe does, and how replay re-runs a run recorded with the
    :data:`STREAM` discipline. Returns (metrics as floats, the batch)."""
    batch = recipe.batch(step)
    metrics = recipe.train_step(model, optimizer, batch)
    if scheduler is not None:
        scheduler.step()
    if not isinstance(metrics, dict) or "loss" not in metrics:
        raise ConfigurationError("recipe.train_step must return a dict of metrics with a 'loss'")
    return {name: float(value) for name, value in metrics.items()}, batch


def run_step(recipe: Any, model: Any, optimizer: Any, scheduler: Any, seed: int,
             step: int) -> tuple[dict[str, float], Any]:
    """Run optimizer step ``step`` of a recipe: seed every RNG with :func:`ledger._recipe.step_seed`,
    then :func:`continue_step` (``recipe.batch(step)``, ``recipe.train_step``, the scheduler) — the
    :data:`RESEED_PER_STEP` discipline. Returns (metrics as floats, the batch)."""
    seed_everything(step_seed(seed, step))
    return continue_step(recipe, model, optimizer, scheduler, step)


__all__ = ["RESEED_PER_STEP", "STREAM", "CountSketch", "Snapshot", "architecture", "batch_digest", "build_scheduler",
           "canonical_state", "continue_step", "deterministic", "environment", "load_tensors", "optimizer_groups",
           "restore", "rng_state", "run_step", "safetensors_dtype", "seed_everything", "set_rng_state",
           "sketch_slots", "snapshot", "snapshot_digests", "tensor_bytes", "torch_digests", "unwrap_optimizer",
           "write_checkpoint", "place_checkpoint", "temporary_name", "being_written", "TEMPORARY", "BatchLeaves",
           "CopyAllowance", "PendingSketch"]
