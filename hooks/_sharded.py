"""Fingerprints of a model whose tensors are sharded across ranks (FSDP2 ``fully_shard``: DTensor
parameters with ``Shard(0)`` placements), computed by each rank on its local shard only, and equal to
the one-process fingerprints of the gathered weights whatever the world size or layout.

API (every rank calls each method at the same point, with the same names in the same order; the
collectives run on the default process group)::

    tensors, aliases = sharded_state(model)  # canonical_state for DTensors (tied weights kept once)
    fp = ShardedFingerprints(seed=policy.sketch_seed, k=policy.sketch_k, skip=policy.sketch_skips)
    fp.is_sharded(tensors)   # bool, no collective: some tensor is a DTensor
    fp.norms(tensors)        # np.ndarray of per-tensor L2 norms, on every rank (one all_reduce)
    fp.launch_norms(tensors) # the same, launched: .value() waits (on CUDA the training thread never does)
    fp.sketch(tensors)       # the count-sketch (np.ndarray of k) on rank 0, None elsewhere (one reduce)
    fp.digests(tensors)      # {name: tensor-blocked/v1 digest} on rank 0, None elsewhere (one gather)

What each rank computes and sends: norms — its local sum of squares per tensor (float64, from
float32 norms of blocks of 65536 elements as in :mod:`ledger.hooks._norms`), 8 bytes per tensor,
all-reduced; sketch — the count-sketch (``count-sketch/v1``, docs/FORMAT.md §10) of its local elements
at their GLOBAL flat indices (:class:`ledger.torch.CountSketch` on pieces that start at an offset:
nothing kept per element), 8·k bytes, summed on rank 0 (the sketch is linear); digests — the hashes of
the ``tensor-blocked/v1`` blocks it holds whole (32 bytes per 65536 elements) and the bytes of the at
most two blocks per tensor it holds in part, gathered on rank 0, which combines them
(:func:`ledger._blocked.combine`, refusing a gap or an overlap). Full weights never travel.

Which rank counts which element: a DTensor's local shard counts on the ranks whose coordinate is 0
along every mesh dimension where the tensor is ``Replicate`` (rank 0's copy for a replicated tensor);
a plain tensor counts on global rank 0 only. A layout whose local shard is not one contiguous range
of the flattened global tensor (``Shard(1)`` of a matrix, ``_StridedShard``), or a ``Partial``
placement, raises :class:`~ledger.errors.ConfigurationError`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from ledger._blocked import BLOCK_ELEMENTS, Piece, blocked_digest, combine, piece
from ledger._device import Landing, common_device, lane_of
from ledger._fingerprint import SKETCH_K
from ledger.errors import ConfigurationError
from ledger.hooks._norms import _LOW, BLOCK, _foreach_norms
from ledger.torch import CountSketch, safetensors_dtype, tensor_bytes

_COPY_BLOCKS = 64  # blocks hashed per device→CPU copy: bounds the extra host memory of a GPU shard


@dataclass(frozen=True, slots=True)
class Local:
    """The part of a named tensor this rank counts: elements ``[start, start + flat.numel())`` of its
    flattened global tensor (``flat``: those elements, 1-D), and the global shape and dtype."""

    flat: torch.Tensor
    start: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def total(self) -> int:
        """Element count of the global tensor."""
        return math.prod(self.shape)


def _flat_range(name: str, shape: tuple[int, ...], local: tuple[int, ...], offset: tuple[int, ...]) -> int:
    """First flat index of a local block of ``shape`` (sizes ``local`` at ``offset``), which must be one
    contiguous range of the C-order flattening: full in every dimension after the last split one, and
    of size 1 in every dimension before it."""
    split = max((i for i, (g, n) in enumerate(zip(shape, local, strict=True)) if n != g), default=-1)
    if math.prod(local) and any(n != 1 for n in local[:max(split, 0)]):
        raise ConfigurationError(f"tensor {name!r}: its local shard {list(local)} at offset {list(offset)} of "
                                 f"{list(shape)} is not one contiguous range of the flattened tensor; shard "
                                 "parameters on dim 0 (fully_shard's default Shard(0)) to fingerprint them")
    stride, start = 1, 0
    for g, o in zip(reversed(shape), reversed(offset), strict=True):
        start += o * stride
        stride *= g
    return start


def local_part(name: str, tensor: torch.Tensor) -> Local | None:
    """What this rank counts of a tensor (None: nothing), or ConfigurationError for a layout that
    cannot be fingerprinted piecewise."""
    from torch.distributed.tensor import DTensor

    dtype, shape = safetensors_dtype(tensor), tuple(int(d) for d in tensor.shape)
    if not isinstance(tensor, DTensor):
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        return Local(tensor.detach().reshape(-1), 0, shape, dtype) if rank0 else None
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()  # part of the key: this rank's place in the mesh
    where = None if coordinate is None else tuple(coordinate)
    layout = _shard_layout(name, shape, mesh, tuple(tensor.placements), where)
    if layout is None:
        return None
    local_shape, start = layout
    local = tensor.to_local().detach()
    if tuple(local.shape) != local_shape:
        raise ConfigurationError(f"tensor {name!r}: its local shard has shape {list(local.shape)}, its placements "
                                 f"give {list(local_shape)}")
    return Local(local.reshape(-1), start, shape, dtype)


@functools.lru_cache(maxsize=1 << 16)
def _shard_layout(name: str, shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...],
                  coordinate: tuple[int, ...] | None) -> tuple[tuple[int, ...], int] | None:
    """(local shape, first flat index) of the shard at ``coordinate`` (this rank's in ``mesh``) of the
    DTensor ``name`` of ``shape`` placed by ``placements``, or None when this rank does not count it;
    computed once per layout (DTensor's own computation costs ~40 µs, at every step for every tensor
    otherwise)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    for p in placements:
        if isinstance(p, _StridedShard) or not isinstance(p, (Shard, Replicate)):
            raise ConfigurationError(f"tensor {name!r} has the placement {p}: only Shard and Replicate placements "
                                     "can be fingerprinted shard by shard (reduce a Partial one first)")
    if coordinate is None or any(c != 0 for c, p in zip(coordinate, placements, strict=True)
                                 if isinstance(p, Replicate)):
        return None
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    local = tuple(int(n) for n in local_shape)
    return local, _flat_range(name, shape, local, tuple(int(o) for o in offset))


def sharded_state(model_or_state: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`ledger.torch.canonical_state` for a model with DTensors (whose storage safetensors
    cannot inspect): its ``state_dict`` tensors, a tensor under several names (tied weights: one
    parameter or buffer of the model under several names; for a plain dict, one DTensor object) kept
    once under the lexicographically first, as for plain models. The same on every rank. Returns
    (tensors, aliases: dropped → kept)."""
    from torch.distributed.tensor import DTensor

    from ledger.torch import canonical_state

    model = hasattr(model_or_state, "state_dict")
    state = model_or_state.state_dict() if model else dict(model_or_state)
    owner: dict[str, int] = {}  # FSDP2's state_dict wraps each name anew: ties show on the module
    if model:
        for name, value in [*model_or_state.named_parameters(remove_duplicate=False),
                            *model_or_state.named_buffers(remove_duplicate=False)]:
            owner[name] = id(value)
    plain, plain_aliases = canonical_state({n: t for n, t in state.items()
                                            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor)})
    names: dict[int, list[str]] = {}
    for name, tensor in state.items():
        if isinstance(tensor, DTensor):
            names.setdefault(owner.get(name, id(tensor)), []).append(name)
    aliases = dict(plain_aliases)
    kept = {}
    for group in names.values():
        first, *others = sorted(group, key=lambda n: n.encode("utf-8"))
        kept[first] = state[first]
        aliases.update(dict.fromkeys(others, first))
    return {n: t for n, t in state.items() if n in plain or n in kept}, aliases


@functools.lru_cache(maxsize=16)
def _index(owners: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The tensor index of each block, on ``device``: copied there once per layout (a host-to-device
    copy at every step would make the training thread wait for the device)."""
    return torch.tensor(owners, dtype=torch.int64).to(device)


@dataclass(frozen=True, slots=True)
class Summed:
    """Per-tensor (or per-group) squares launched on a lane and summed across ranks; :meth:`value`
    (the writer thread) waits for them and takes the roots."""

    landing: Landing
    collective: Any = None  # an all-reduce still running off the device's streams (gloo's work)

    def value(self) -> npt.NDArray[np.float64]:
        """The L2 norms (float64)."""
        if self.collective is not None:
            self.collective.wait()
        return np.sqrt(self.landing.value()[0].numpy().astype(np.float64))


def launch_summed(reads: list[torch.Tensor], squares: Callable[[], torch.Tensor]) -> Summed:
    """``squares()`` (of ``reads``, on :func:`sum_device`) launched on the reads' lane and summed
    across ranks: on CUDA on the side stream, the NCCL all-reduce included, so the training thread
    does not wait for the device; with gloo (a CPU collective) on CPU tensors the all-reduce runs on
    gloo's threads, waited for by :meth:`Summed.value` (the writer thread), not the training thread.
    (CUDA tensors under gloo reduce at once: the lane's host copy is taken when it is queued.)"""
    lane, running = lane_of(reads), []

    def work() -> list[torch.Tensor]:
        total = squares()
        if dist.is_initialized():
            if total.device.type == "cpu" and lane.streamless:  # the landing holds ``total`` itself
                running.append(dist.all_reduce(total, op=dist.ReduceOp.SUM, async_op=True))
            else:  # on the current (side) stream after the sums (NCCL: without the host)
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return [total]

    landing = lane.launch(work, reads)
    return Summed(landing, running[0] if running else None)


def _collective_device() -> torch.device:
    backend = str(dist.get_backend()) if dist.is_initialized() else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def sum_device(reads: list[torch.Tensor]) -> torch.device:
    """Where per-rank sums of ``reads`` are formed: the collective's device under a process group
    (CUDA for NCCL, the CPU for gloo), else the tensors' one device (the CPU when several)."""
    return _collective_device() if dist.is_initialized() else common_device(reads)


class ShardedFingerprints:
    """Norms, count-sketch and ``tensor-blocked/v1`` digests of sharded (and plain) tensors, each rank
    working on its local shards (see the module docstring). ``seed`` and ``k``: the genesis
    ``fingerprints.sketch_seed`` and ``sketch_k``. Nothing is kept per element: the sketch's
    buckets and signs are recomputed at each call by :class:`ledger.torch.CountSketch`."""

    def __init__(self, seed: int, k: int = SKETCH_K, skip: Iterable[str] = ()) -> None:
        self._counts = CountSketch(seed, k, skip)  # skip: genesis ``fingerprints.sketch_skips``

    @staticmethod
    def is_sharded(tensors: Mapping[str, torch.Tensor]) -> bool:
        """True when some tensor is a DTensor (then the methods below are needed to fingerprint them)."""
        from torch.distributed.tensor import DTensor

        return any(isinstance(t, DTensor) for t in tensors.values())

    @staticmethod
    def parts(tensors: Mapping[str, torch.Tensor]) -> dict[str, Local | None]:
        """What this rank counts of each tensor (None: nothing)."""
        return {name: local_part(name, t) for name, t in tensors.items()}

    def norms(self, tensors: Mapping[str, torch.Tensor]) -> npt.NDArray[np.float64]:
        """Per-tensor L2 norms of the global tensors, in the order given, on every rank."""
        return self.launch_norms(tensors).value()

    def launch_norms(self, tensors: Mapping[str, torch.Tensor]) -> Summed:
        """:meth:`norms`, launched on the local shards' lane (``ledger._device``): on CUDA the block
        norms, their per-tensor sums and the all-reduce are queued on a side stream and copied to
        pinned host memory, so the training thread never waits for the device; ``value()`` (the
        writer thread) waits. Elsewhere they run now (gloo's all-reduce included)."""
        parts = list(self.parts(tensors).values())
        reads: list[torch.Tensor] = []
        exact: list[tuple[int, torch.Tensor]] = []  # integer parts: one exact float64 square each
        groups: dict[bool, tuple[list[torch.Tensor], list[int]]] = {False: ([], []), True: ([], [])}
        for i, part in enumerate(parts):
            if part is None or part.flat.numel() == 0:
                continue
            flat = part.flat
            reads.append(flat)
            if not flat.is_floating_point():
                exact.append((i, flat))
                continue
            blocks, owners = groups[flat.dtype in _LOW]
            split = torch.split(flat, BLOCK)
            blocks.extend(split)
            owners.extend([i] * len(split))
        device = sum_device(reads)
        work_groups = [(low, blocks, _index(tuple(owners), device))
                       for low, (blocks, owners) in groups.items() if blocks]
        count = len(parts)

        def squares() -> torch.Tensor:  # on CUDA index_add_ sums with atomics: the order, and so the last
            total = torch.zeros(count, dtype=torch.float64, device=device)  # bit of a float64, can vary
            for low, blocks, index in work_groups:
                total.index_add_(0, index, _foreach_norms(blocks, low).double().square().to(device))
            for i, flat in exact:
                total[i] += flat.double().square().sum().to(device)
            return total

        return launch_summed(reads, squares)

    def sketch(self, tensors: Mapping[str, torch.Tensor]) -> npt.NDArray[np.float64] | None:
        """The count-sketch of the global tensors (float64, k values) on rank 0; None on the others."""
        parts = {name: part for name, part in self.parts(tensors).items() if part is not None}
        mine = self._counts({name: part.flat for name, part in parts.items()},
                            {name: part.start for name, part in parts.items()})
        if not dist.is_initialized():
            return mine
        reduced = torch.from_numpy(mine).to(_collective_device())
        dist.reduce(reduced, dst=0, op=dist.ReduceOp.SUM)
        return reduced.cpu().numpy() if dist.get_rank() == 0 else None

    def digests(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, bytes] | None:
        """``tensor-blocked/v1`` digests of the global tensors on rank 0 (None on the others); plain
        tensors are hashed whole by rank 0, sharded ones from every rank's pieces."""
        from torch.distributed.tensor import DTensor

        mine: list[tuple[str, Piece]] = []
        whole: dict[str, bytes] = {}
        for name, tensor in tensors.items():
            part = local_part(name, tensor)
            if part is None:
                continue
            if not isinstance(tensor, DTensor):
                whole[name] = blocked_digest(name, part.dtype, part.shape, tensor_bytes(tensor))
                continue
            mine.extend((name, p) for p in _pieces(part))
        gathered: list[Any] = [mine]
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
            dist.gather_object(mine, gathered if dist.get_rank() == 0 else None, dst=0)
            if dist.get_rank() != 0:
                return None
        by_name: dict[str, list[Piece]] = {}
        for pieces in gathered:
            for name, p in pieces:
                by_name.setdefault(name, []).append(p)
        out: dict[str, bytes] = {}
        for name, tensor in tensors.items():
            if name in whole:
                out[name] = whole[name]
            else:
                out[name] = combine(name, safetensors_dtype(tensor), tuple(tensor.shape), by_name.get(name, []))
        return out


def _pieces(part: Local) -> list[Piece]:
    """The pieces of a local range, split at global block boundaries every :data:`_COPY_BLOCKS` blocks
    so that a shard on a device is copied to the CPU a bounded run at a time."""
    span = BLOCK_ELEMENTS * _COPY_BLOCKS
    start, stop = part.start, part.start + part.flat.numel()
    cuts = [start, *range((start // span + 1) * span, stop, span), stop]
    return [piece(part.dtype, part.total, lo, tensor_bytes(part.flat[lo - start:hi - start]))
            for lo, hi in zip(cuts, cuts[1:], strict=False) if hi > lo or start == stop]
