"""Where the recorder's overhead comes from on the charlm reference workload (examples/charlm.py).

Runs, interleaved in blocks in one process with the same batches: plain training; the recorder at
default settings; without sketches; without sketches and batch digests; and the default recorder
with its background writer switched off (entries computed, never signed or written). Prints each
median step time and its ratio to plain training.

    python benchmarks/recorder_ablation.py [--blocks 16] [--block 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

import ledger
from ledger.hooks import FingerprintOptions, Recorder

VARIANTS = {
    "plain": None,
    "recorder (default)": {},
    "no sketch": {"sketch": 0},
    "no sketch, no batch digest": {"sketch": 0},
    "default, background writer off": {},
}


def build(recipe: Any, name: str, options: dict[str, Any] | None, root: Path) -> tuple[Any, Any, Recorder | None]:
    model = recipe.build_model(0)
    optimizer = recipe.build_optimizer(model)
    if options is None:
        return model, optimizer, None
    rec = Recorder(root / name.replace(" ", "_").replace(",", ""), model=model, optimizer=optimizer,
                   key=ledger.Signer.from_seed(bytes(32)), seed=0, fingerprints=FingerprintOptions(**options))
    if name.endswith("writer off"):
        rec._queue.put = lambda job: None  # type: ignore[method-assign]  # the ablation: nothing is written
    return model, optimizer, rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block", type=int, default=20)
    args = parser.parse_args()
    recipe, _ = ledger.load_recipe(f"{Path(__file__).resolve().parent.parent / 'examples' / 'charlm.py'}:recipe")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: build(recipe, name, options, Path(tmp)) for name, options in VARIANTS.items()}
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        steps = dict.fromkeys(VARIANTS, 0)
        for block in range(args.blocks):
            for name, (model, optimizer, rec) in runs.items():
                for _ in range(args.block):
                    x, y = recipe.batch(steps[name])
                    steps[name] += 1
                    start = time.perf_counter()
                    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    if rec is not None:
                        rec.step(loss=loss, batch=None if "no batch" in name else (x, y))
                    if block:  # the first block is warm-up
                        times[name].append(time.perf_counter() - start)
        for _, _, rec in runs.values():
            if rec is not None:
                rec.abort()
    base = statistics.median(times["plain"])
    print(f"charlm, {args.blocks - 1} blocks of {args.block} steps per variant, torch threads 2")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<34} median step {median * 1e3:6.2f} ms  ratio {median / base:.3f}")


if __name__ == "__main__":
    main()
