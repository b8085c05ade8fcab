"""Producers of ledger entries (the training side): :class:`Recorder` for a plain PyTorch loop,
:func:`train` for a fully recorded run from a recipe, and :func:`deterministic`.

This package imports torch; ``ledger`` itself never does at import time.
"""

from __future__ import annotations

from ledger._recipe import deterministic, run_step
from ledger.hooks._recorder import Recorder
from ledger.hooks._train import train

__all__ = ["Recorder", "deterministic", "run_step", "train"]
