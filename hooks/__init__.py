"""Producers of ledger entries (the training side). The PyTorch ``Recorder`` and ``train``
arrive here; this package may import torch, ``ledger`` never does at import time."""

from __future__ import annotations

__all__: list[str] = []
