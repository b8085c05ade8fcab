"""A two-process DDP Lightning fit (CPU, gloo) recorded by LedgerCallback, started by
tests/test_lightning.py: ``python tests/lightning_ddp.py OUT KEY`` with ``MASTER_PORT`` set.
Lightning's launcher starts rank 1 by running this script again."""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from test_lightning import Tiny, loader, trainer

from ledger.hooks.lightning import LedgerCallback


def main() -> None:
    out, key = Path(sys.argv[1]), sys.argv[2]
    warnings.filterwarnings("ignore", module="lightning")
    L.seed_everything(3, verbose=False)
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    callback = LedgerCallback(out / "ledger", key=key, checkpoint_every=3)
    trainer(callbacks=[callback], strategy=strategy, devices=2, max_epochs=1).fit(Tiny("sgd"), loader())
    if torch.distributed.is_initialized():  # gloo's threads left to interpreter exit may abort it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # everything is closed: skip interpreter teardown, where gloo's threads abort at random


if __name__ == "__main__":
    main()
