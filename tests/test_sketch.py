"""The cache-free count-sketch and the measurement lane (ledger/_device.py) of norms and sketches.

What is protected: the torch sketch, which keeps nothing per coordinate, equals the numpy reference
(`NumpySketch`, the definition of docs/FORMAT.md §10) up to summation order on every shape of input,
and pieces of tensors sketched at their offsets (a rank's shards) sum to the whole tensors' sketch;
its temporaries stay bounded whatever the tensor size; and norms and sketches go through the lane
in the order that keeps the training thread from waiting for the device (checked on the CPU with a
recording stand-in for CUDA's streams, and on CUDA itself when there is one).
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ledger.hooks._norms as norms_module
import ledger.hooks._sharded as sharded_module
import ledger.torch as lt
from ledger._device import HostBackend, Lane, lane_for
from ledger._fingerprint import sketch_hash
from ledger._weights import NumpySketch
from ledger.hooks._norms import BLOCK, Norms, group_norms
from ledger.hooks._sharded import ShardedFingerprints
from ledger.hooks._sharded_run import group_grad_norms


def reference(seed: int, k: int, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    return NumpySketch(seed, k)({name: t.detach().double().numpy() for name, t in tensors.items()})


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float64 and ours.shape == theirs.shape
    assert float(np.abs(ours - theirs).max()) <= 1e-12 * max(float(np.abs(theirs).max()), 1e-300)


def model(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors above and below the pass size (patched to 2**10 below), odd sizes, several dtypes."""
    return {"big": torch.randn(5 * 1024 + 7, generator=g), "whole": torch.randn(2048, generator=g),
            "w": torch.randn(33, 31, generator=g), "empty": torch.zeros(0, 4), "b": torch.randn(1, generator=g),
            "bf16": (torch.randn(999, generator=g) * 5).bfloat16(), "half": torch.randn(700, generator=g).half(),
            "f64": torch.randn(1500, generator=g).double(), "t": torch.randn(40, 30, generator=g).t(),
            "steps": torch.randint(-(2**40), 2**40, (300,), generator=g), "mask": torch.rand(77, generator=g) > 0.5}


def test_skipped_tensors_are_left_out_by_both_sketches_and_the_file_pass(tmp_path) -> None:
    """``skip`` (genesis ``sketch_skips``) drops whole tensors: torch, numpy and the bounded file
    pass give the sketch of the other tensors."""
    from safetensors.torch import save_file

    from ledger._weights import file_fingerprints

    tensors = model(torch.Generator().manual_seed(3))
    skip = ["big", "steps"]
    rest = {n: t for n, t in tensors.items() if n not in skip}
    expected = reference(7, 64, rest)
    assert_close(lt.CountSketch(7, 64, skip)(tensors), expected)
    assert_close(NumpySketch(7, 64, skip)({n: t.double().numpy() for n, t in tensors.items()}), expected)
    save_file({n: t.contiguous() for n, t in tensors.items()}, tmp_path / "m.safetensors")
    found = file_fingerprints(tmp_path / "m.safetensors", list(tensors), NumpySketch(7, 64, skip))
    assert found is not None and found[1] is not None
    assert_close(found[1], expected)
    assert not np.allclose(lt.CountSketch(7, 64)(tensors), expected)


@pytest.mark.parametrize("chunk", [1 << 10, 1 << 18])
@pytest.mark.parametrize("k", [2, 256, 1 << 17])
def test_cache_free_sketch_equals_the_numpy_reference(monkeypatch: pytest.MonkeyPatch, chunk: int, k: int) -> None:
    monkeypatch.setattr(lt, "_CHUNK", chunk)
    tensors = model(torch.Generator().manual_seed(k))
    sketch = lt.CountSketch(5, k)
    for _ in range(2):  # the plan is built, then reused
        assert_close(sketch(tensors), reference(5, k, tensors))
    assert_close(sketch.measure(tensors).value(), reference(5, k, tensors))
    fewer = {name: t for name, t in tensors.items() if name != "w"}  # other tensors: a new plan
    assert_close(sketch(fewer), reference(5, k, fewer))
    assert np.array_equal(sketch({"empty": torch.zeros(0)}), np.zeros(k)) and np.array_equal(sketch({}), np.zeros(k))


@pytest.mark.parametrize("start, stop", [(2**31 - 7, 2**31 + 9), (2**32 - 3, 2**32 + 3), (2**33 - 1, 2**33 + 1)])
@pytest.mark.parametrize("k", [2, 256, 1 << 17])
def test_int32_hash_equals_the_definition_across_word_boundaries(start: int, stop: int, k: int) -> None:
    index = np.arange(start, stop, dtype=np.int64)
    for seed, name in [(0, "w"), (-1, "é"), (2**63 - 1, "layers.0.weight")]:
        assert lt.sketch_slots(seed, name, start, stop, k, "cpu").tolist() == sketch_hash(index, seed, name, k).tolist()


def test_passes_cover_every_coordinate_once_and_never_cross_a_multiple_of_2_32() -> None:
    spans = [("a", 0, 3), ("huge", 0, 2**32 + 2**18 + 5), ("b", 0, 2**18), ("c", 0, 2**17 + 1), ("d", 0, 2**17),
             ("shard", 2**32 - 2**18 - 9, 2**32 + 2**19 + 3), ("inside", 2**18 + 5, 2**18 + 70),
             ("edge", 2**19, 2**19 + 1)]
    seen: dict[str, list[tuple[int, int]]] = {}
    for p in lt._passes(0, spans, torch.device("cpu"), 2**18):
        assert p.size <= 2**18 and (p.spread is None) == (len(p.pieces) == 1)
        for name, start, stop in p.pieces:
            assert start >> 18 == (stop - 1) >> 18  # within one multiple of the pass size, so of 2**32
            seen.setdefault(name, []).append((start, stop))
    for name, first, end in spans:
        pieces = sorted(seen[name])
        assert pieces[0][0] == first and pieces[-1][1] == end
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))


@pytest.mark.parametrize("chunk", [1 << 10, 1 << 18])
@pytest.mark.parametrize("k", [2, 256, 1 << 17])
def test_pieces_at_offsets_sum_to_the_sketch_of_their_tensor(monkeypatch: pytest.MonkeyPatch, chunk: int,
                                                               k: int) -> None:
    """Three "ranks" each sketch their piece of every tensor at its flat offset (cuts mid-pass, at a
    pass boundary, empty pieces, one element): the pieces' sketches sum to the whole tensors'."""
    monkeypatch.setattr(lt, "_CHUNK", chunk)
    tensors = model(torch.Generator().manual_seed(k + 1))
    flats = {name: t.reshape(-1) for name, t in tensors.items()}
    cuts = {name: [0, n // 3, n - 1, n] for name, n in ((name, flat.numel()) for name, flat in flats.items())}
    cuts["big"] = [0, 1000, 1024, 5 * 1024 + 7]  # a piece ending on a pass boundary, one starting on it
    cuts["b"] = [0, 0, 1, 1]
    sketch, total = lt.CountSketch(5, k), np.zeros(k)
    for rank in range(3):
        starts = {name: at[rank] for name, at in cuts.items()}
        total += sketch({name: flat[starts[name]:cuts[name][rank + 1]] for name, flat in flats.items()}, starts)
    assert_close(total, reference(5, k, tensors))


@pytest.mark.parametrize("start", [2**31 - 700, 2**32 - 5, 2**33 - 2**18 - 3])
def test_a_piece_far_into_its_tensor_is_sketched_at_its_global_indices(start: int) -> None:
    values = torch.randn(3000, generator=torch.Generator().manual_seed(3)).double()
    slots = sketch_hash(np.arange(start, start + 3000, dtype=np.int64), 9, "layers.0.weight", 64)
    sums = np.bincount(slots, weights=values.numpy(), minlength=128)
    assert_close(lt.CountSketch(9, 64)({"layers.0.weight": values}, {"layers.0.weight": start}), sums[:64] - sums[64:])


class LiveBytes(TorchDispatchMode):
    """The most bytes that tensors created under the mode held at once (storages counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        known = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            key = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else 0
            if key and key not in known and key not in self.live:
                self.live[key] = t.untyped_storage().nbytes()
                weakref.finalize(t, self.live.pop, key, None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def test_sketch_memory_is_bounded_whatever_the_tensor_size() -> None:
    tensor = torch.randn(16 * 2**20)  # 64 MiB; a per-coordinate int16 cache would take 32 MiB
    peaks = []
    for n in (2**18, tensor.numel()):
        sketch = lt.CountSketch(3)
        with LiveBytes() as during:
            value = sketch({"t": tensor[:n]})
        kept = sum(b.untyped_storage().nbytes() for plan in sketch._plans.values()
                   for b in (plan.base, plan.x, plan.tmp, plan.packed, plan.values))
        assert kept <= during.peak <= 32 * lt._CHUNK + 2**16 and 32 * lt._CHUNK <= 8 * 2**20
        peaks.append(during.peak)
        assert_close(value, reference(3, 256, {"t": tensor[:n]}))
    assert peaks[0] == peaks[1]  # 64 passes take what one does


class Recorded:
    """A stand-in for CUDA's streams and events that logs what a lane asks of them."""

    def __init__(self, name: str, log: list[tuple[str, ...]]) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: Recorded) -> None:
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event: Recorded) -> None:
        self.log.append(("wait_event", self.name, event.name))

    def record_event(self) -> Recorded:
        self.log.append(("record_event", self.name))
        return Recorded(f"event on {self.name}", self.log)

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.name))


class RecordingBackend(HostBackend):
    """Host tensors, streams that only log: the order of a lane's calls, checked without a GPU."""

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []

    def current_stream(self) -> Any:
        return Recorded("current", self.log)

    def new_stream(self) -> Any:
        return Recorded("side", self.log)

    def use(self, stream: Any) -> Any:
        self.log.append(("use", stream.name))
        return nullcontext()

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        self.log.append(("to_host",))
        return tensor.clone()

    def keep(self, tensor: torch.Tensor, stream: Any) -> None:
        self.log.append(("keep", stream.name))


def expected_log(results: int, reads: int) -> list[tuple[str, ...]]:
    return ([("wait_stream", "side", "current"), ("use", "side")] + [("to_host",)] * results
            + [("record_event", "side")] + [("keep", "side")] * reads + [("wait_event", "current", "event on side")])


def test_norms_and_sketch_launch_on_the_side_stream_and_wait_only_when_read(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = RecordingBackend()
    lane = Lane(backend)
    monkeypatch.setattr(norms_module, "lane_of", lambda tensors: lane)
    monkeypatch.setattr(lt, "lane_for", lambda device: lane)
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(70_000, generator=g), "h": torch.randn(9, generator=g).half(),
               "n": torch.tensor(3), "e": torch.zeros(0)}
    plan = Norms(list(tensors.values()))
    pending = plan.measure(list(tensors.values()))
    assert backend.log == expected_log(2 + 2, 4)  # two groups of blocks, two exact norms; four tensors read
    backend.log.clear()
    monkeypatch.setattr(norms_module, "lane_of", lambda tensors: lane_for(torch.device("cpu")))
    direct = Norms(list(tensors.values())).measure(list(tensors.values())).value()  # float32 blocks summed by numpy
    assert np.allclose(pending.value(), direct, rtol=BLOCK * 2.0**-24, atol=0)
    assert backend.log == [("synchronize", "event on side")]
    backend.log.clear()

    sketch = lt.CountSketch(11).measure(tensors)
    assert backend.log == expected_log(1, 3)  # the 2k slot sums; the three non-empty tensors read
    backend.log.clear()
    assert_close(sketch.value(), reference(11, 256, tensors))
    assert backend.log == [("synchronize", "event on side")]
    backend.log.clear()

    monkeypatch.setattr(norms_module, "lane_of", lambda tensors: lane)
    grads = group_norms([[tensors["w"], tensors["h"]], [], [tensors["e"]]])  # the post-step gradient norms
    assert backend.log == expected_log(1, 3)  # one vector of group norms; three tensors read
    backend.log.clear()
    expected = [float(np.sqrt(tensors["w"].double().square().sum() + tensors["h"].float().norm().double() ** 2)),
                0.0, 0.0]
    assert np.allclose(grads.value()[0].numpy(), expected, rtol=1e-6, atol=0)
    assert backend.log == [("synchronize", "event on side")]


def test_sharded_norms_and_gradient_norms_launch_on_the_side_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FSDP2 path (hooks/_sharded.py, _sharded_run.py), here without a process group: the
    per-tensor squares and the per-group gradient norms are launched on the lane (on CUDA: a side
    stream, where the all-reduce also runs) and waited for only when the writer reads them."""
    backend = RecordingBackend()
    lane = Lane(backend)
    monkeypatch.setattr(sharded_module, "lane_of", lambda tensors: lane)
    g = torch.Generator().manual_seed(3)
    tensors = {"w": torch.randn(3 * BLOCK + 5, generator=g), "h": torch.randn(9, generator=g).half(),
               "n": torch.tensor([3, 4]), "e": torch.zeros(0)}
    pending = ShardedFingerprints(7, 64).launch_norms(tensors)
    assert backend.log == expected_log(1, 3)  # one vector of squares; the three non-empty tensors read
    backend.log.clear()
    direct = Norms(list(tensors.values())).measure(list(tensors.values())).value()
    norms = pending.value()
    assert np.allclose(norms, direct, rtol=BLOCK * 2.0**-24, atol=0) and norms[2] == 5.0 and norms[3] == 0.0
    assert backend.log == [("synchronize", "event on side")]
    backend.log.clear()

    model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Linear(400, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.5}], lr=0.1)
    model(torch.randn(8, 300, generator=g)).square().mean().backward()
    grads = group_grad_norms(opt)
    assert backend.log == expected_log(1, 4)  # one vector of group norms; four gradients read
    backend.log.clear()
    expected = [float(torch.cat([p.grad.double().reshape(-1) for p in group["params"]]).norm())
                for group in opt.param_groups]
    assert np.allclose(grads.value(), expected, rtol=BLOCK * 2.0**-24, atol=0)  # float32 sums, any order
    assert backend.log == [("synchronize", "event on side")]


def test_the_cpu_lane_runs_the_work_at_once() -> None:
    lane = lane_for(torch.device("cpu"))
    assert isinstance(lane.backend, HostBackend) and lane.streamless
    landing = lane.launch(lambda: [torch.ones(3) * 2], [])
    assert landing.value()[0].tolist() == [2.0, 2.0, 2.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_norms_and_sketch_equal_the_cpu_ones_without_synchronising() -> None:
    g = torch.Generator().manual_seed(1)
    cpu = {"w": torch.randn(300_001, generator=g), "b": torch.randn(17, generator=g).bfloat16(),
           "n": torch.tensor(4), "big": torch.randn(2**22 + 3, generator=g)}
    cuda = {name: t.cuda() for name, t in cpu.items()}
    sketch, plan = lt.CountSketch(7), Norms(list(cuda.values()))
    sketch.measure(cuda).value()  # the plan of the passes (host-to-device copies) is built once
    sharded = ShardedFingerprints(7, 64)
    sharded.launch_norms(cuda).value()  # so is the sharded path's block index
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending_sketch, pending_norms = sketch.measure(cuda), plan.measure(list(cuda.values()))
        pending_grads = group_norms([[cuda["w"], cuda["b"]], [cuda["big"]]])
        pending_sharded = sharded.launch_norms(cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t in cuda.values():
        t.zero_()  # queued after the measurements on the current stream: they read the values before
    assert_close(pending_sketch.value(), reference(7, 256, cpu))
    expected = Norms(list(cpu.values())).measure(list(cpu.values())).value()
    assert np.allclose(pending_norms.value(), expected, rtol=1e-6, atol=0)
    assert np.allclose(pending_sharded.value(), expected, rtol=1e-6, atol=0)
    grads = group_norms([[cpu["w"], cpu["b"]], [cpu["big"]]]).value()[0]
    assert np.allclose(pending_grads.value()[0].numpy(), grads.numpy(), rtol=1e-6, atol=0)
