"""The character-level transformer trained with a PyTorch Lightning ``Trainer``, recorded by one callback.

``python examples/lightning_fit.py --out lightning-out`` fits, seals and verifies. The line marked
``# ledger`` is all a Lightning script needs; ``seed_everything`` gives the seed genesis records.
Gradient accumulation over 2 batches: one ledger step per optimizer step (``--steps`` of them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _outdir import fresh_output  # examples/_outdir.py (the script's folder is on sys.path)
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import ledger
from ledger.hooks.lightning import LedgerCallback

ACCUMULATE = 2


class Batches(Dataset):  # type: ignore[type-arg]
    """The recipe's deterministic batches, one per index."""

    def __init__(self, recipe: Any, count: int) -> None:
        self.recipe, self.count = recipe, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.recipe.batch(index)  # type: ignore[no-any-return]


class CharLM(L.LightningModule):
    """The example's transformer, AdamW and warm-up schedule, in a LightningModule."""

    def __init__(self, recipe: Any, seed: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.model = recipe.build_model(seed)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss, on_step=True, on_epoch=True)  # recorded: its on_step value
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.recipe.build_optimizer(self.model)
        scheduler = self.recipe.build_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lightning-out"))
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    fresh_output(args.out)
    warnings.filterwarnings("ignore", module="lightning")  # its tips about workers and loggers
    private_key, public_key = ledger.generate_keypair(args.out / "keys" / "trainer")
    recipe, _ = ledger.load_recipe(f"{Path(__file__).with_name('charlm.py')}:recipe")

    L.seed_everything(args.seed, verbose=False)
    module = CharLM(recipe, args.seed)
    data = DataLoader(Batches(recipe, args.steps * ACCUMULATE), batch_size=None)  # the dataset yields batches
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=ACCUMULATE, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LedgerCallback(args.out / "ledger", key=private_key, checkpoint_every=25,  # ledger
                                                  final_weights=args.out / "model.safetensors")])
    trainer.fit(module, data)

    command = [sys.executable, "-m", "ledger", "verify", str(args.out / "ledger"), "--key", str(public_key),
               "--model", str(args.out / "model.safetensors")]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
