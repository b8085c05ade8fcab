"""Producers of ledger entries (the training side): :class:`Recorder` for a plain PyTorch loop,
:func:`train` for a fully recorded run from a recipe, and :func:`deterministic`.

This package imports torch (the ``torch`` extra); ``ledger`` itself never does at import time.
"""

from __future__ import annotations

from ledger.hooks._options import FingerprintOptions
from ledger.hooks._recorder import Recorder
from ledger.hooks._train import train
from ledger.torch import deterministic, run_step

__all__ = ["FingerprintOptions", "Recorder", "deterministic", "run_step", "train"]
