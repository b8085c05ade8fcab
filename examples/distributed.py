"""The same recorder under torch.distributed: 2 processes on this CPU (gloo), data parallel (DDP) or
sharded (FSDP2 ``fully_shard``), one ledger written by rank 0, verified at the end.

``python examples/distributed.py --out dist-out [--layout ddp|fsdp]``. On a cluster the training
function is the same; start it with ``torchrun`` instead of :func:`torch.multiprocessing.spawn`. The
lines marked ``# ledger`` are what a distributed loop needs: ``Recorder(...)`` on every rank with the
same arguments, ``rec.step`` on every rank, ``rec.close`` on every rank.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import ledger
from ledger.hooks import Recorder

WORLD = 2


def parallel_mlp(widths: list[int], layout: str) -> torch.nn.Module:
    """An MLP (Linear layers of ``widths``, GELU between) built from seed 0 — the same init on every
    rank — and made parallel: ``"ddp"`` (replicated) or ``"fsdp"`` (every Linear sharded with FSDP2)."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        layers += [torch.nn.GELU()] if i else []
        layers.append(torch.nn.Linear(a, b))
    model = torch.nn.Sequential(*layers)
    if layout != "fsdp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model[::2]:
        fully_shard(layer)
    return fully_shard(model)


def train(rank: int, port: int, out: Path, layout: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    wrapped = parallel_mlp([32, 256, 256, 1], layout)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    rec = Recorder(out / "ledger", model=wrapped, optimizer=optimizer, key=out / "keys" / "trainer.pem",  # ledger
                   seed=0, checkpoint_every=25 if layout == "ddp" else None, config={"layout": layout})
    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(steps):
        x = torch.randn(64, 32, generator=generator)
        loss = (wrapped(x).squeeze(1) - x[:, :4].sum(1)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rec.step(loss=loss, batch=x)  # ledger (metrics and batch digest: rank 0's)
    rec.close(final_weights=out / "model.safetensors")  # ledger (FSDP: the weights are gathered to rank 0 here)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("dist-out"))
    parser.add_argument("--layout", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    from _outdir import fresh_output  # examples/_outdir.py (the script's folder is on sys.path)

    fresh_output(args.out)
    _, public_key = ledger.generate_keypair(args.out / "keys" / "trainer")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(train, args=(port, args.out, args.layout, args.steps), nprocs=WORLD)
    command = [sys.executable, "-m", "ledger", "verify", str(args.out / "ledger"), "--key", str(public_key),
               "--model", str(args.out / "model.safetensors")]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
