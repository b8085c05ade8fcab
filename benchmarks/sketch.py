"""Benchmark of the count-sketch per call: a per-parameter slot cache vs the cache-free sketch vs numpy.

Workloads: the two models of benchmarks/recorder_overhead.py (charlm, 110 k parameters; 15M, 15.8 M),
float32 on the CPU. Variants, timed in interleaved rounds (the order rotates each round) so machine
noise hits all alike; medians of wall and CPU time per call:

- ``cached``: what ``CountSketch`` did before (slots computed once per tensor, kept as int16, 2 bytes
  per parameter; each call one ``bincount`` per tensor), rebuilt here as the baseline;
- ``cache-free``: :class:`ledger.torch.CountSketch` (bucket and sign recomputed at each call);
- ``numpy``: the reference :class:`ledger._weights.NumpySketch` on the same arrays (what the verifier
  computes for checkpoints and ``--model``; its slots hashed in uint32, in place);
- ``numpy-int64``: the same with the slots of the int64 definition (``sketch_hash``: the 16-bit split
  products), as ``NumpySketch`` computed them before 2026-12-01.

Peak extra memory: one subprocess per (workload, variant); after the model is built (and, for
``cached``, its cache), VmHWM is reset to VmRSS, three sketches run, and VmHWM − VmRSS-before is
printed; the cache's own size is reported beside it. Figures only, no assertions.

    python benchmarks/sketch.py                 # ~1 min on 2 cores
    python benchmarks/sketch.py --rounds 40 --chunk 20   # cache-free passes of 2**20 coordinates
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorder_overhead import SEED, make_recipe  # noqa: E402

import ledger._weights as weights  # noqa: E402
import ledger.torch as lt  # noqa: E402
from ledger._fingerprint import sketch_hash  # noqa: E402
from ledger._weights import NumpySketch  # noqa: E402

K = 256
Sketch = Callable[[Mapping[str, torch.Tensor]], np.ndarray]


def cached_sketch(tensors: Mapping[str, torch.Tensor]) -> tuple[Sketch, int]:
    """The former cached sketch of these tensors (slots kept as int16) and its cache size in bytes."""
    slots = {name: lt.sketch_slots(SEED, name, 0, t.numel(), K, "cpu").to(torch.int16) for name, t in tensors.items()}

    def sketch(tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        total = torch.zeros(K, dtype=torch.float64)
        for name, t in tensors.items():
            acc = torch.bincount(slots[name], weights=t.detach().reshape(-1).double(), minlength=2 * K)
            total += acc[:K] - acc[K:]
        return total.numpy()

    return sketch, sum(s.nbytes for s in slots.values())


def variants(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, Sketch], int]:
    """The four sketches of these tensors, and the cached one's cache size (bytes)."""
    cached, cache_bytes = cached_sketch(tensors)
    numpy_sketch = NumpySketch(SEED, K)
    arrays = {name: t.detach().numpy() for name, t in tensors.items()}

    def int64_slots(seed: int, name: str, start: int, stop: int, k: int) -> np.ndarray:
        return sketch_hash(np.arange(start, stop, dtype=np.int64), seed, name, k)

    def numpy_int64(_: Mapping[str, torch.Tensor]) -> np.ndarray:
        fast, weights.sketch_slots_numpy = weights.sketch_slots_numpy, int64_slots  # type: ignore[assignment]
        try:
            return numpy_sketch(arrays)
        finally:
            weights.sketch_slots_numpy = fast

    return {"cached": cached, "cache-free": lt.CountSketch(SEED, K),
            "numpy": lambda _: numpy_sketch(arrays), "numpy-int64": numpy_int64}, cache_bytes


def model_tensors(workload: str) -> dict[str, torch.Tensor]:
    """The workload's state tensors, as the recorder sketches them."""
    tensors, _ = lt.canonical_state(make_recipe(workload).build_model(SEED))
    return tensors


def vm(field: str) -> int:
    """A /proc/self/status field in KiB."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def child_memory(workload: str, variant: str) -> None:
    """In a subprocess: the peak RSS (KiB) three sketches add once model (and cache) are built."""
    tensors = model_tensors(workload)
    sketch = variants(tensors)[0][variant]
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    before = vm("VmRSS")
    for _ in range(3):
        sketch(tensors)
    print(vm("VmHWM") - before)


def timed(workload: str, rounds: int) -> None:
    """Interleaved per-call timings of the variants on one workload, printed with ratios."""
    tensors = model_tensors(workload)
    sketches, cache_bytes = variants(tensors)
    reference = sketches["numpy"](tensors)
    for name, sketch in sketches.items():
        out = sketch(tensors)  # warm-up, and the values agree up to summation order
        assert np.allclose(out, reference, rtol=0, atol=1e-9 * np.abs(reference).max()), name
    wall: dict[str, list[float]] = {name: [] for name in sketches}
    cpu: dict[str, list[float]] = {name: [] for name in sketches}
    names = list(sketches)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            w, c = time.perf_counter(), time.process_time()
            sketches[name](tensors)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    params = sum(t.numel() for t in tensors.values())
    print(f"\n{workload}: {params:,} parameters in {len(tensors)} tensors, {rounds} rounds, "
          f"{torch.get_num_threads()} threads, chunk 2**{lt._CHUNK.bit_length() - 1}")
    base_wall, base_cpu = statistics.median(wall["cached"]), statistics.median(cpu["cached"])
    for name in names:
        mw, mc = statistics.median(wall[name]), statistics.median(cpu[name])
        extra = subprocess.run([sys.executable, __file__, "--chunk", str(lt._CHUNK.bit_length() - 1),
                                "--child-memory", workload, name], capture_output=True, text=True, check=True)
        kept = f", kept {cache_bytes / 2**20:.1f} MiB" if name == "cached" else ""
        print(f"  {name:10s} wall {mw * 1e3:8.2f} ms ({mw / base_wall:5.2f}x)  cpu {mc * 1e3:8.2f} ms "
              f"({mc / base_cpu:5.2f}x)  peak extra RSS {int(extra.stdout.split()[-1]) / 1024:6.1f} MiB{kept}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=lt._CHUNK.bit_length() - 1, help="log2 of the pass size")
    parser.add_argument("--workloads", nargs="+", default=["charlm", "15M"])
    parser.add_argument("--child-memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lt._CHUNK = 1 << args.chunk
    if args.child_memory:
        child_memory(*args.child_memory)
        return
    for workload in args.workloads:
        timed(workload, args.rounds)


if __name__ == "__main__":
    main()
