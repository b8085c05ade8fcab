"""Sharding-invariant fingerprints under FSDP2 (hooks/_sharded.py): each rank fingerprints its local
shards only, and the combined norms, count-sketch and ``tensor-blocked/v1`` digests equal the
one-process values of the gathered weights, at world sizes 1 and 2 (gloo, CPU, real ``fully_shard``).

Run as a script, this file is one rank of such a run:
``python tests/test_sharded.py RANK WORLD PORT OUT``; rank 0 writes ``OUT/result.json``."""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ledger.hooks._sharded as sharded_module
import ledger.torch as lt
from ledger._blocked import TENSOR_BLOCKED_V1, safetensors_blocked_digests
from ledger._device import HostBackend, Lane
from ledger.errors import ConfigurationError
from ledger.hooks._norms import BLOCK, Norms
from ledger.hooks._sharded import ShardedFingerprints, _flat_range, _pieces, local_part, sharded_state
from ledger.hooks._sharded_run import group_grad_norms
from ledger.torch import CountSketch, canonical_state, torch_digests

SEED, K = 7, 64
BIG_ROWS, BIG_COLS = 5003, 1000  # 5 003 000 elements; 5003 rows split unevenly over 2 ranks


class Net(torch.nn.Module):
    """An embedding of several million elements, layers whose dim 0 (7, 3) does not divide by 2, a
    bf16 layer, and a plain integer buffer (FSDP2 shards parameters only)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(BIG_ROWS, BIG_COLS)
        self.proj = torch.nn.Linear(BIG_COLS, 7)
        self.head = torch.nn.Linear(7, 3)
        self.low = torch.nn.Linear(3, 5).to(torch.bfloat16)
        self.register_buffer("seen", torch.arange(6, dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.head(self.proj(self.embed(ids).mean(1)))
        return self.low(hidden.to(torch.bfloat16)).float()


def _reference(full: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One-process fingerprints of the gathered weights."""
    names = list(full)
    return {"digests": {n: d.hex() for n, d in torch_digests(full, TENSOR_BLOCKED_V1).items()},
            "norms": Norms([full[n] for n in names]).measure([full[n] for n in names]).value().tolist(),
            "sketch": CountSketch(SEED, K)(full).tolist(),
            "exact_norms": [float(full[n].double().norm()) for n in names],
            "sizes": [full[n].numel() for n in names]}


class Copying(HostBackend):
    """A lane backend with streams (like CUDA's): its host copy is taken when the work is queued."""

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()


def worker(rank: int, world: int, port: str, out: Path) -> None:
    """One rank: shard the model with fully_shard, take one SGD step on the same batch on every rank,
    fingerprint the local shards, and (rank 0) record them next to the gathered weights' values."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = Net()
    for module in (model.embed, model.proj, model.head, model.low):
        fully_shard(module)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, BIG_ROWS, (4, 6), generator=torch.Generator().manual_seed(1))
    model(ids).pow(2).mean().backward()
    opt.step()
    grad_norms = group_grad_norms(opt).value().tolist()  # every rank: a collective
    full_grads = [[(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).double() for p in g["params"]
                   if p.grad is not None] for g in opt.param_groups]
    grad_reference = [math.sqrt(sum(float(g.square().sum()) for g in grads)) for grads in full_grads]
    state = model.state_dict()
    assert sum(isinstance(t, DTensor) for t in state.values()) == 7, {n: type(t) for n, t in state.items()}
    mesh = init_device_mesh("cpu", (world,))
    state["replicated"] = distribute_tensor(torch.arange(10, dtype=torch.float32), mesh, [Replicate()])
    fp = ShardedFingerprints(SEED, K)
    assert fp.is_sharded(state)
    timings = {}
    began = time.perf_counter()
    norms = fp.norms(state)
    timings["norms"] = time.perf_counter() - began
    launched = fp.launch_norms(state)  # gloo: the all-reduce runs on gloo's threads; value() waits for it
    assert launched.collective is not None and launched.value().tolist() == norms.tolist()
    real_lane = sharded_module.lane_of
    sharded_module.lane_of = lambda tensors: Lane(Copying())  # as CUDA tensors under gloo: a lane with streams
    try:
        copied = fp.launch_norms(state)
    finally:
        sharded_module.lane_of = real_lane
    assert copied.collective is None and copied.value().tolist() == norms.tolist()  # reduced before the copy
    began = time.perf_counter()
    sketch, again = fp.sketch(state), fp.sketch(state)  # the second one reuses the first one's plan
    timings["sketch"] = time.perf_counter() - began
    skipped = ShardedFingerprints(SEED, K, ["seen", "proj.weight"]).sketch(state)  # genesis sketch_skips
    began = time.perf_counter()
    digests = fp.digests(state)
    timings["digests"] = time.perf_counter() - began
    pieces = [p for n, t in state.items() if isinstance(t, DTensor) and (part := local_part(n, t)) is not None
              for p in _pieces(part)]
    sent = {"bytes": len(pickle.dumps(pieces)), "fragment_bytes": sum(len(f.data) for p in pieces for f in p.fragments)}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, (norms.tolist(), sent))
    refused = ""
    try:
        fp.digests({"cols": distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])})
    except ConfigurationError as exc:
        refused = str(exc)
    full = {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach() for n, t in state.items()}
    torch.manual_seed(0)
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    expected = canonical_state(tied)
    fully_shard(tied)
    tensors, aliases = sharded_state(tied)  # canonical_state itself cannot read DTensor storage
    assert list(tensors) == list(expected[0]) and aliases == expected[1] == {"1.weight": "0.weight"}
    if rank == 0:
        assert sketch is not None and again is not None and digests is not None
        save_file({n: t.contiguous() for n, t in full.items()}, str(out / "model.safetensors"))
        result = {"world": world, "digests": {n: d.hex() for n, d in digests.items()}, "norms": norms.tolist(),
                  "sketch": sketch.tolist(), "sketch_again": again.tolist(), "reference": _reference(full),
                  "skipped": skipped.tolist(), "skipped_reference": CountSketch(SEED, K, ["seen", "proj.weight"])(
                      full).tolist(),
                  "refused": refused, "timings": timings, "ranks": every, "names": list(state),
                  "grad_norms": grad_norms, "grad_reference": grad_reference}
        (out / "result.json").write_text(json.dumps(result))
    else:
        assert sketch is None and digests is None
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(world: int, out: Path) -> dict[str, Any]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), port, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return dict(json.loads((out / "result.json").read_text()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[dict[str, Any], Path]]:
    out = {}
    for world in (1, 2):
        folder = tmp_path_factory.mktemp(f"world{world}")
        out[world] = (_run(world, folder), folder)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_combined_fingerprints_equal_the_gathered_weights(runs: dict[int, tuple[dict[str, Any], Path]],
                                                          world: int) -> None:
    result, folder = runs[world]
    ref = result["reference"]
    assert result["digests"] == ref["digests"]  # bit for bit
    assert {n: d.hex() for n, d in safetensors_blocked_digests(folder / "model.safetensors").items()} \
        == result["digests"]
    # float32 block norms: within the verifier's tolerance of the exact norm, as the one-process ones
    bound = np.minimum(np.asarray(ref["sizes"]), 1 << 16) * 2.0 ** -24 + 2.0 ** -24
    for norms in (result["norms"], ref["norms"]):
        assert np.all(np.abs(np.asarray(norms) - ref["exact_norms"]) <= bound * np.asarray(ref["exact_norms"]))
    assert np.allclose(result["norms"], ref["exact_norms"], rtol=1e-6, atol=0)
    sketch, expected = np.asarray(result["sketch"]), np.asarray(ref["sketch"])
    assert np.linalg.norm(sketch - expected) <= 1e-9 * np.linalg.norm(expected)
    assert np.linalg.norm(np.asarray(result["sketch_again"]) - expected) <= 1e-9 * np.linalg.norm(expected)
    skipped, expected = np.asarray(result["skipped"]), np.asarray(result["skipped_reference"])
    assert np.linalg.norm(skipped - expected) <= 1e-9 * np.linalg.norm(expected)
    assert np.linalg.norm(skipped - np.asarray(result["sketch"])) > 1e-3 * np.linalg.norm(expected)
    assert "embed.weight" in result["names"] and "seen" in result["names"]
    assert all(norms == result["norms"] for norms, _ in result["ranks"])  # every rank has the norms
    # the gradient norms per param group from the local shards (one all-reduce) are the full gradients'
    assert len(result["grad_norms"]) == 1 and result["grad_reference"][0] > 0
    assert np.allclose(result["grad_norms"], result["grad_reference"], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_the_digests_do_not_depend_on_the_world_size(runs: dict[int, tuple[dict[str, Any], Path]]) -> None:
    one, two = runs[1][0], runs[2][0]
    assert one["digests"] == two["digests"]  # the same batch on every rank: the same weights
    assert two["refused"].startswith("tensor 'cols'") and "contiguous range" in two["refused"]
    assert one["refused"] == ""  # Shard(1) on one rank is the whole tensor


def test_one_process_without_a_process_group() -> None:
    tensors = {"w": torch.randn(300, 500), "b": torch.randn(7).to(torch.bfloat16), "i": torch.arange(5)}
    fp = ShardedFingerprints(SEED, K)
    assert not fp.is_sharded(tensors)
    assert fp.digests(tensors) == torch_digests(tensors, TENSOR_BLOCKED_V1)
    ref = Norms(list(tensors.values())).measure(list(tensors.values())).value()
    assert np.allclose(fp.norms(tensors), ref, rtol=BLOCK * 2.0**-24)  # the recorder sums CPU float32 with numpy
    sketch = fp.sketch(tensors)
    assert sketch is not None and np.allclose(sketch, CountSketch(SEED, K)(tensors), rtol=1e-12, atol=1e-12)


def kept_bytes(obj: Any, seen: dict[int, Any] | None = None) -> int:
    """Bytes of the tensor storages reachable from an object's attributes and containers."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return 0
    seen[id(obj)] = obj  # kept alive: no other object takes its id during the walk
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(kept_bytes(key, seen) + kept_bytes(value, seen) for key, value in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(kept_bytes(value, seen) for value in obj)
    slots = [getattr(obj, a) for c in type(obj).__mro__ for a in getattr(c, "__slots__", ()) if hasattr(obj, a)]
    return kept_bytes(slots, seen) + kept_bytes(getattr(obj, "__dict__", {}), seen)


def test_the_sketch_keeps_nothing_per_element() -> None:
    """What a ShardedFingerprints holds after sketching does not grow with the element count: the
    same for 2**19 as for 2**23 elements, at most the passes' scratch (an int16 slot per element
    would be 16 MiB here)."""
    g = torch.Generator().manual_seed(2)
    kept = []
    for n in (2**19 + 5, 2**23 + 5):
        tensors = {"w": torch.randn(n, generator=g), "b": torch.randn(9, generator=g)}
        fp = ShardedFingerprints(SEED, K)
        sketch = fp.sketch(tensors)
        assert sketch is not None and np.allclose(sketch, CountSketch(SEED, K)(tensors), rtol=1e-12, atol=1e-12)
        kept.append(kept_bytes(fp))
    assert kept[0] == kept[1] <= 32 * lt._CHUNK + 2**16


@pytest.mark.parametrize(("shape", "local", "offset", "start"), [
    ((7, 5), (4, 5), (0, 0), 0), ((7, 5), (3, 5), (4, 0), 20), ((7,), (0,), (7,), 7),
    ((1, 9), (1, 4), (0, 5), 5), ((2, 3, 4), (1, 1, 4), (1, 2, 0), 20), ((4, 6), (4, 6), (0, 0), 0)])
def test_the_global_range_of_a_local_shard(shape: tuple[int, ...], local: tuple[int, ...],
                                           offset: tuple[int, ...], start: int) -> None:
    assert _flat_range("t", shape, local, offset) == start


@pytest.mark.parametrize(("shape", "local", "offset"), [((4, 6), (4, 3), (0, 3)), ((2, 3, 4), (2, 1, 4), (0, 1, 0))])
def test_a_shard_that_is_not_one_range_is_refused(shape: tuple[int, ...], local: tuple[int, ...],
                                                  offset: tuple[int, ...]) -> None:
    with pytest.raises(ConfigurationError, match="not one contiguous range"):
        _flat_range("t", shape, local, offset)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
