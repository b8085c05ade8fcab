"""Quickstart: train a small model, keep a signed ledger of every step, verify it.

Run from the repository root: ``python examples/quickstart.py --out demo-out``. It writes a fresh
key pair, a ledger and the trainer's public key under ``--out`` and finishes with the verdict of
``ledger verify`` (exit code 0 when the ledger passes).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import ledger


def train(ledger_dir: Path, private_key: Path, steps: int, seed: int) -> None:
    """A tiny regression trained with AdamW; each optimizer step appends a signed entry."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    true_w = torch.randn(8, 1)
    writer = ledger.LedgerWriter.create(ledger_dir, private_key, genesis={
        "config": {"lr": 1e-2, "steps": steps, "model": "mlp-8-32-1"}, "seed": seed})
    for step in range(steps):
        x = torch.randn(64, 8)
        y = x @ true_w + 0.1 * torch.randn(64, 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        norms = torch.stack([p.detach().norm() for p in model.parameters()])
        writer.append("step", step, {"metrics": {"loss": loss.item()}, "norms": norms})
    writer.seal()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)  # the demo's own output folder, recreated on every run
    private_key, public_key = ledger.generate_keypair(args.out / "keys" / "trainer")
    train(args.out / "ledger", private_key, args.steps, args.seed)
    print(f"trained {args.steps} steps; ledger in {args.out / 'ledger'}")
    command = [sys.executable, "-m", "ledger", "verify", str(args.out / "ledger"), "--key", str(public_key)]
    print("$ ledger verify", args.out / "ledger", "--key", public_key, flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
