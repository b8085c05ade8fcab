"""The same character-level transformer in a hand-written loop, recorded with three added lines.

``python examples/manual_loop.py --out manual-out`` trains, seals and verifies. The lines marked
``# ledger`` are all that a plain PyTorch loop needs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from _outdir import fresh_output  # examples/_outdir.py (the script's folder is on sys.path)
from torch.nn import functional as F

import ledger
from ledger.hooks import Recorder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("manual-out"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    fresh_output(args.out)
    private_key, public_key = ledger.generate_keypair(args.out / "keys" / "trainer")
    data, _ = ledger.load_recipe(f"{Path(__file__).with_name('charlm.py')}:recipe")  # its model and data

    model = data.build_model(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rec = Recorder(args.out / "ledger", model=model, optimizer=optimizer, key=private_key,  # ledger
                   seed=args.seed, checkpoint_every=50, config={"lr": 3e-3, "steps": args.steps})
    for step in range(args.steps):
        x, y = data.batch(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rec.step(loss=loss, batch=(x, y))  # ledger
    rec.close(final_weights=args.out / "model.safetensors")  # ledger

    command = [sys.executable, "-m", "ledger", "verify", str(args.out / "ledger"), "--key", str(public_key),
               "--model", str(args.out / "model.safetensors")]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
