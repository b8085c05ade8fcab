"""What continuity's evidence is on a BatchNorm CNN recorded at default settings: how many of the
sketches the budget paid for were checked, and how far a jump the norms miss is localised.

A 4-block CNN (``Conv2d`` + ``BatchNorm2d`` + ReLU, AdamW) on random 32×32 images, checkpoints every
100 steps, the default 1 % budget, then ``verify --model`` of the result. The running statistics
move at every step; before ``count-sketch/v2`` (docs/FORMAT.md §10) they voided every sketch
interval, so none was checked and the localisation was the checkpoint interval. The cadence follows
the measured step time, so a loaded machine takes fewer sketches. Figures only, no assertions.

    python benchmarks/batchnorm_evidence.py            # ~20 s on 2 cores
    python benchmarks/batchnorm_evidence.py --steps 600
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ledger
from ledger import Kind, Signer
from ledger.hooks import Recorder
from ledger.verify import verify_ledger


def block(inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(block(3, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    signer = Signer.from_seed(b"\x05" * 32)
    with tempfile.TemporaryDirectory() as tmp:
        path, final = Path(tmp) / "L", Path(tmp) / "final.safetensors"
        rec = Recorder(path, model=model, optimizer=optimizer, key=signer, seed=0, checkpoint_every=100)
        g = torch.Generator().manual_seed(0)
        began = time.perf_counter()
        for _ in range(args.steps):
            x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            rec.step(loss=loss, batch=(x, y))
        rec.close(final_weights=final)
        trained = time.perf_counter() - began
        sketched = [e.step for e in ledger.open(path).entries() if e.kind is Kind.STEP and "sketch" in e.body()]
        genesis = next(iter(ledger.open(path).entries())).body()["fingerprints"]
        check = verify_ledger(path, key=signer.public, model=final).check("continuity")
    data = check.data
    kind = genesis.get("sketch_kind", "count-sketch/v1")
    print(f"{args.steps} steps recorded in {trained:.1f} s; sketch kind {kind}, "
          f"{len(genesis.get('sketch_skips', []))} buffers left out of the sketches")
    print(f"continuity {check.status}: {data['sketch_steps_checked']} of {len(sketched)} sketches checked, "
          f"{data['sketch_intervals_skipped']} skipped; a jump the norms miss localised to "
          f"≤ {data['localisation_steps']} step(s)")
    print(f"steps carrying a sketch (the budget's cadence): {sketched}")


if __name__ == "__main__":
    main()
