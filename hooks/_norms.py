"""Per-tensor L2 norms every step, accurate on tensors of any size and cheap on the training thread.

A float32 sum over a whole tensor drifts (7e-4 relative at 16M elements, 1e-2 when every element is
equal, as after Adam's first step from zeros), so each tensor is split into blocks of 65536
elements (views, no copy), the blocks' norms are taken in one fused call accumulating in float32
(bf16/f16 widened to float32 first; float64 in float64), and their squares summed per tensor in
float64. A logged norm is then off by at most 65536·2⁻²⁴ relative (the verifier's tolerance,
``ledger.verify._bounds.norm_rtol``). The training thread only launches the kernels (on CUDA on a
side stream, copied to pinned host memory: ``ledger._device``); the per-tensor sums are finished on
the writer thread (no device synchronisation while training). Float32 and float64 blocks in CPU
memory are instead summed by ``numpy.dot`` on views of the tensors' own memory (a BLAS dot: float32
accumulated in float32, the same definition), 2.5–2.8× cheaper than torch's per-tensor CPU
dispatch on small tensors (charlm's 29 tensors: 20 vs 55 µs; 113 tensors: 112 vs 282 µs); the
whole blocks of a tensor of at least ``ROWS`` elements are the rows of one ``vector_norm(dim=1)``,
which torch spreads over its intra-op threads, idle between steps (15.8 M parameters after a step,
2 threads: 5.4 → 3.5 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ledger._device import NOTHING, Landing, common_device, lane_of
from ledger.torch import host_bytes, in_memory

BLOCK = 1 << 16
ROWS = 4 * BLOCK  # CPU tensors of at least this many elements: their blocks' norms in one torch reduction
POLICY = "every step (L2 of float32 blocks of 65536 accumulated in float64, tensor_order)"
_LOW = (torch.bfloat16, torch.float16)
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass(frozen=True, slots=True)
class Pending:
    """Block norms launched on the training thread; :meth:`value` finishes them (writer thread)."""

    count: int
    landing: Landing  # the block norms of each group, then the exact norms
    starts: tuple[npt.NDArray[np.int64], ...]  # per group: the first block of each tensor
    owners: tuple[npt.NDArray[np.int64], ...]  # per group: which tensor each run of blocks belongs to
    exact: tuple[int, ...]  # the tensors normed exactly (in float64)
    host: tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None
    # CPU float32/float64 tensors: (squared norms of their blocks, first block of each, which tensor)

    def value(self) -> npt.NDArray[np.float64]:
        """The per-tensor norms (float64)."""
        results = self.landing.value()
        out = np.zeros(self.count)
        if self.host is not None:
            squares, starts, owners = self.host
            out[owners] = np.add.reduceat(squares, starts)
        for norms, starts, owners in zip(results[:len(self.starts)], self.starts, self.owners, strict=True):
            out[owners] = np.add.reduceat(np.square(norms.double().numpy()), starts)
        for index, norm in zip(self.exact, results[len(self.starts):], strict=True):
            out[index] = float(norm) ** 2
        return np.sqrt(out)


def _host_views(tensor: torch.Tensor) -> tuple[torch.Tensor | None, list[npt.NDArray[np.floating]]]:
    """A CPU float tensor's whole blocks as the rows of one matrix (tensors of at least ``ROWS``
    elements; else None) and its other blocks as numpy views of its memory (not ``.numpy()``,
    which would forbid resizing it for good)."""
    whole = tensor.numel() // BLOCK * BLOCK if tensor.numel() >= ROWS else 0
    rows = tensor.detach().reshape(-1)[:whole].view(-1, BLOCK) if whole else None
    flat = np.frombuffer(host_bytes(tensor.detach()), _NUMPY[tensor.dtype])[whole:]
    return rows, [flat[lo:lo + BLOCK] for lo in range(0, flat.size, BLOCK)]


def _where(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Each tensor's address and element count."""
    return list(map(torch.Tensor.data_ptr, tensors)), list(map(torch.Tensor.numel, tensors))


def _foreach_norms(tensors: list[torch.Tensor], low: bool) -> torch.Tensor:
    """The norms of same-kind tensors in one fused call (bf16/f16 accumulated in float32)."""
    return torch.stack(torch._foreach_norm(tensors, dtype=torch.float32) if low else torch._foreach_norm(tensors))


def total_square(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """The sum of the tensors' squared L2 norms (float64 on ``device``, default the CPU; each norm
    accumulated in float32, bf16/f16 widened first)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for low in (False, True):
        same = [t for t in tensors if (t.dtype in _LOW) == low]
        for where in dict.fromkeys(t.device for t in same):  # one fused call per device
            on = [t for t in same if t.device == where]
            total = total + _foreach_norms(on, low).double().square().sum().to(total.device)
    return total


def total_norm(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """The L2 norm of several tensors together (float64 on ``device``, default the CPU)."""
    return total_square(tensors, device).sqrt()


def group_norms(groups: Sequence[Sequence[torch.Tensor]]) -> Landing:
    """Per group, the L2 norm of its tensors together (float64), launched on their lane: on one
    CUDA device on a side stream, so the training thread does not wait for the device (tensors on
    several devices: summed on the CPU). ``value()[0]`` is the vector of norms."""
    reads = [t for group in groups for t in group]
    device = common_device(reads)
    return lane_of(reads).launch(lambda: [torch.stack([total_norm(group, device) for group in groups])], reads)


class Norms:
    """The block views of a fixed list of tensors, built once; rebuild when :meth:`current` is false
    (a tensor's storage was replaced: ``p.data = other``), giving the plan before as ``previous``:
    the views of the tensors that kept their address and size are taken from it, not made again
    (a model that replaces one tensor at each step does not pay for all of them)."""

    def __init__(self, tensors: Sequence[torch.Tensor], previous: Norms | None = None) -> None:
        self.count = len(tensors)
        # The views below keep a replaced storage alive (``p.data = other``), so a new one never has
        # its address; a ``resize_`` keeps the address when it shrinks: addresses and sizes together
        # tell every change the views would misread (~0.2 µs a tensor).
        self._addresses = _where(tensors)
        kept: list[Any] | None = None
        if previous is not None and previous.count == self.count:
            (addresses, sizes), (before, sized) = self._addresses, previous._addresses
            kept = [piece if (addresses[i], sizes[i]) == (before[i], sized[i]) else None
                    for i, piece in enumerate(previous._pieces)]
        self._pieces: list[Any] = []  # per tensor, its views: ("host", rows, blocks), ("torch", blocks) or None
        groups: dict[bool, tuple[list[torch.Tensor], list[int], list[int]]] = {False: ([], [], []), True: ([], [], [])}
        exact: list[int] = []
        host: tuple[list[npt.NDArray[np.floating]], list[int], list[int]] = ([], [], [])
        rows: list[tuple[int, torch.Tensor]] = []  # (first block, the whole blocks as rows) of large tensors
        blocks_before = 0  # host blocks so far, counting the rows
        small: list[int] = []  # the position of each numpy block among all host blocks
        self._lane = lane_of(tensors)
        streamless = self._lane.streamless  # a CPU model: no side stream to run on
        for i, tensor in enumerate(tensors):
            piece = kept[i] if kept is not None else None
            if not tensor.is_floating_point() or not tensor.is_contiguous() or tensor.numel() == 0:
                exact.append(i)  # integer buffers, rare non-contiguous tensors: one exact float64 norm
                self._pieces.append(None)
                continue
            if streamless and tensor.dtype in (torch.float32, torch.float64) and in_memory(tensor.detach()):
                if piece is None or piece[0] != "host":
                    piece = ("host", *_host_views(tensor))
                self._pieces.append(piece)
                _, whole_rows, views = piece
                host[1].append(blocks_before)
                host[2].append(i)
                if whole_rows is not None:  # one reduction over the rows, on torch's intra-op threads
                    rows.append((blocks_before, whole_rows))
                    blocks_before += whole_rows.shape[0]
                host[0].extend(views)
                small.extend(range(blocks_before, blocks_before + len(views)))
                blocks_before += len(views)
                continue
            if piece is None or piece[0] != "torch":
                piece = ("torch", torch.split(tensor.detach().reshape(-1), BLOCK))
            self._pieces.append(piece)
            blocks, starts, owners = groups[tensor.dtype in _LOW]
            starts.append(len(blocks))
            owners.append(i)
            blocks.extend(piece[1])
        self._groups = [(low, blocks, np.asarray(starts, dtype=np.int64), np.asarray(owners, dtype=np.int64))
                        for low, (blocks, starts, owners) in groups.items() if blocks]
        self._host = (host[0], np.asarray(host[1], dtype=np.int64), np.asarray(host[2], dtype=np.int64)) \
            if host[1] else None
        self._rows, self._small, self._host_blocks = rows, np.asarray(small, dtype=np.int64), blocks_before
        self.exact = tuple(exact)
        self._starts = tuple(starts for _, _, starts, _ in self._groups)
        self._owners = tuple(owners for *_, owners in self._groups)

    def current(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether each of ``tensors`` still has the address and size this plan's views read."""
        return _where(tensors) == self._addresses

    def measure(self, tensors: Sequence[torch.Tensor]) -> Pending:
        """Launch this step's norms (``tensors`` as given to the constructor, for the exact ones):
        on CUDA on a side stream the training thread does not wait for (``ledger._device``)."""
        landing = NOTHING
        if self._groups or self.exact:
            exact = [tensors[i].detach() for i in self.exact]
            blocks = [(low, blocks) for low, blocks, _, _ in self._groups]

            def work() -> list[torch.Tensor]:
                return [_foreach_norms(b, low) for low, b in blocks] + [t.double().norm() for t in exact]

            landing = self._lane.launch(work, tensors)
        host = None
        if self._host is not None:
            views, starts, owners = self._host
            squares = np.fromiter((np.dot(v, v) for v in views), np.float64, len(views))
            if self._rows:
                placed = np.empty(self._host_blocks)
                placed[self._small] = squares
                with torch.no_grad():
                    for first, matrix in self._rows:
                        norms = torch.linalg.vector_norm(matrix, dim=1).double().numpy()
                        placed[first:first + len(norms)] = np.square(norms)
                squares = placed
            host = (squares, starts, owners)
        return Pending(self.count, landing, self._starts, self._owners, self.exact, host)
