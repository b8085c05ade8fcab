"""Benchmark of the recorder under torch.distributed: 2 processes on this CPU (gloo), a 5.3M-parameter
MLP (512 → 2048 → 2048 → 512, batch 64; ``parallel_mlp`` of examples/distributed.py), data parallel
(DDP) and sharded (FSDP2 ``fully_shard``).

For each layout, a plain and a recorded run (same seed, same batches, ``checkpoint_every=None``,
fingerprints at their defaults) each train ``--steps`` steps; the first 10 are warm-up. Printed per
rank: median step time plain and recorded and their ratio, and the median time a rank spends inside
``rec.step`` (on rank 0: norms, cadence, queueing, and for FSDP the collectives; on rank 1, a DDP
follower does nothing per step, an FSDP follower takes part in the norm all-reduce and, when due,
the sketch reduce and digest gather). The optimizer post-step hook's gradient-norm all-reduce (FSDP)
is inside the step time. Figures only, no assertions; two ranks share two cores, so absolute times
are those of a loaded machine.

    python benchmarks/distributed_overhead.py [--steps 60]
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ledger
from ledger.hooks import Recorder

WORLD = 2
WARMUP = 10
ROOT = Path(__file__).resolve().parent.parent


def example() -> Any:
    """examples/distributed.py, whose parallel_mlp builds the model and makes it parallel."""
    spec = importlib.util.spec_from_file_location("distributed_example", ROOT / "examples" / "distributed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rank_main(rank: int, port: int, layout: str, recorded: bool, steps: int, out: Path, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))
    torch.set_num_threads(1)
    wrapped = example().parallel_mlp([512, 2048, 2048, 512], layout)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    rec = Recorder(out / "ledger", model=wrapped, optimizer=optimizer, key=out / "k.pem", seed=0) if recorded \
        else None
    generator = torch.Generator().manual_seed(rank)
    step_times, rec_times = [], []
    for _ in range(steps):
        x = torch.randn(64, 512, generator=generator)
        t0 = time.perf_counter()
        loss = (wrapped(x) - x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        t1 = time.perf_counter()
        if rec is not None:
            rec.step(loss=loss, batch=x)
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        rec_times.append(t2 - t1)
    if rec is not None:
        rec.close()
    queue.put((rank, statistics.median(step_times[WARMUP:]), statistics.median(rec_times[WARMUP:])))
    dist.destroy_process_group()


def run(layout: str, recorded: bool, steps: int) -> dict[int, tuple[float, float]]:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ledger.generate_keypair(Path(tmp) / "k")
        context = torch.multiprocessing.get_context("spawn")
        queue = context.SimpleQueue()
        torch.multiprocessing.spawn(rank_main, args=(port, layout, recorded, steps, Path(tmp), queue), nprocs=WORLD)
        results = [queue.get() for _ in range(WORLD)]
    return {rank: (step, inside) for rank, step, inside in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    print(f"{'layout':<6} {'rank':>4} {'plain ms':>9} {'recorded ms':>12} {'ratio':>6} {'in rec.step ms':>15}")
    for layout in ("ddp", "fsdp"):
        plain = run(layout, False, args.steps)
        recorded = run(layout, True, args.steps)
        for rank in range(WORLD):
            p, (r, inside) = plain[rank][0], recorded[rank]
            print(f"{layout:<6} {rank:>4} {1e3 * p:>9.2f} {1e3 * r:>12.2f} {r / p:>6.3f} {1e3 * inside:>15.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
