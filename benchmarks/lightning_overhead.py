"""Overhead of LedgerCallback on a Lightning fit: the same fit with and without the callback.

The workload is the examples' character transformer (examples/charlm.py: dim 64, 2 layers,
context 64, batch 32, AdamW with warm-up) in a LightningModule on the CPU, ``--steps`` optimizer
steps. Plain and recorded fits alternate (P R R P P R ...) so machine noise hits both alike; the
first pair is a warm-up and is dropped. Two figures per fit: the training loop (first
``on_train_batch_start`` to last ``on_train_batch_end``, measured by a callback placed after the
ledger's) and the whole ``Trainer.fit`` (adds genesis, the seal and writing the final weights).
The loop is timed in wall and in process CPU time (all threads, the recorder's writer thread
included), the latter less sensitive to other load on the machine; torch runs ``--threads`` threads.
The recorder runs at its defaults (``checkpoint_every=None``). Prints medians and ratios; no
assertions.

    python benchmarks/lightning_overhead.py                 # ~1-2 min on 2 cores
    python benchmarks/lightning_overhead.py --steps 300 --runs 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import ledger
from ledger import Signer
from ledger.hooks.lightning import LedgerCallback

CHARLM = Path(__file__).resolve().parent.parent / "examples" / "charlm.py"


class Batches(Dataset):  # type: ignore[type-arg]
    """The recipe's deterministic batches, one per index."""

    def __init__(self, recipe: Any, count: int) -> None:
        self.recipe, self.count = recipe, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        return self.recipe.batch(index)


class CharLM(L.LightningModule):
    """The recipe's model, optimizer and schedule."""

    def __init__(self, recipe: Any) -> None:
        super().__init__()
        self.recipe, self.model = recipe, recipe.build_model(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss, on_step=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.recipe.build_optimizer(self.model)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.recipe.build_scheduler(optimizer), "interval": "step"}}


class LoopClock(L.Callback):
    """Wall and process CPU time from the first batch's start to the last batch's end."""

    def __init__(self) -> None:
        self.start: tuple[float, float] | None = None
        self.end = (0.0, 0.0)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.start is None:
            self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.end = (time.perf_counter(), time.process_time())


def fit(recipe: Any, steps: int, recorded: bool, out: Path, signer: Signer) -> tuple[float, float, float]:
    """One fit; returns (loop wall seconds, loop CPU seconds, fit wall seconds)."""
    L.seed_everything(1, verbose=False)
    clock = LoopClock()
    callbacks: list[Any] = [LedgerCallback(out / "ledger", key=signer)] if recorded else []
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, clock])
    module = CharLM(recipe)
    t0 = time.perf_counter()
    trainer.fit(module, DataLoader(Batches(recipe, steps), batch_size=None))
    total = time.perf_counter() - t0
    assert clock.start is not None
    return clock.end[0] - clock.start[0], clock.end[1] - clock.start[1], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--runs", type=int, default=5, help="fits of each kind after the warm-up pair")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least sensitive to other load)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="lightning")
    torch.set_num_threads(args.threads)
    recipe, _ = ledger.load_recipe(f"{CHARLM}:recipe")
    signer = Signer.from_seed(bytes(32))
    times: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    order = [False, True] + [kind for i in range(args.runs) for kind in ((True, False) if i % 2 else (False, True))]
    with tempfile.TemporaryDirectory() as tmp:
        for n, recorded in enumerate(order):
            result = fit(recipe, args.steps, recorded, Path(tmp) / f"run{n}", signer)
            if n >= 2:
                times[recorded].append(result)
    print(f"lightning {L.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.steps} steps, median of {args.runs} fits each")
    for k, what in enumerate(("training loop, wall", "training loop, CPU")):
        plain = statistics.median(t[k] for t in times[False])
        recorded = statistics.median(t[k] for t in times[True])
        print(f"{what}: plain {1e3 * plain / args.steps:.2f} ms/step, recorded {1e3 * recorded / args.steps:.2f} "
              f"ms/step, ratio {recorded / plain:.3f}")
    plain, recorded = (statistics.median(t[2] for t in times[kind]) for kind in (False, True))
    print(f"whole fit, wall: plain {plain:.2f} s, recorded {recorded:.2f} s, ratio {recorded / plain:.3f}")


if __name__ == "__main__":
    main()
