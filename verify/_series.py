"""The training series a report shows (loss, learning rates), read once while verifying."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ledger._record import Kind
from ledger.verify._load import Loaded
from ledger.verify._run import RunView

Series = tuple[list[int], list[float]]


def training_series(loaded: Loaded, view: RunView | None) -> dict[str, Any]:
    """``loss`` and ``lrs`` (label → series) by step, the last entry of a step winning (a resumed run
    re-records steps); each absent one has its reason under ``notes``."""
    notes: dict[str, str] = {}
    out: dict[str, Any] = {"loss": None, "lrs": {}, "notes": notes}
    table = loaded.table
    if not table.num_rows:
        notes["loss"] = notes["lrs"] = "the ledger holds no readable entries"
        return out
    rows = table.filter(pc.equal(table["kind"], Kind.STEP.label))
    loss, lr = _metric(rows, "loss"), _metric(rows, "lr")
    if loss[0]:
        out["loss"] = loss
    if lr[0]:
        out["lrs"]["lr"] = lr
    if out["loss"] is None:
        notes["loss"] = "no step entry logs a 'loss' metric"
    if not out["lrs"] and view is not None:  # no 'lr' metric: the per-group learning rates of the step bodies
        cols = view.steps.columns
        logged = cols.has_lrs
        for g in range(cols.lrs.shape[1] if logged.any() else 0):
            out["lrs"][f"group {g}"] = (cols.steps[logged].tolist(), cols.lrs[logged, g].tolist())
    if not out["lrs"]:
        notes["lrs"] = "no step entry logs an 'lr' metric or per-group learning rates"
    return out


def _metric(rows: pa.Table, key: str) -> Series:
    """(steps, values) of metric ``key`` by step, ascending: of each step its last row's value, where
    that row logs one that is not NaN (a row logging a key twice: the last one)."""
    n = rows.num_rows
    if not n:
        return [], []
    steps = np.asarray(rows["step"].to_numpy(), dtype=np.int64)
    _, first_reversed = np.unique(steps[::-1], return_index=True)
    last = n - 1 - first_reversed  # each step's last row, by step
    metrics = rows["metrics"].combine_chunks()
    offsets = np.asarray(metrics.offsets, dtype=np.int64)  # into the keys and items of every row
    hits = np.flatnonzero(np.asarray(pc.equal(metrics.keys, key)))
    hits = hits[(hits >= offsets[0]) & (hits < offsets[-1])]
    row = np.searchsorted(offsets, hits, side="right") - 1
    keep = ~np.asarray(metrics.is_null())[row]
    hits, row = hits[keep], row[keep]
    found, where = np.unique(row[::-1], return_index=True)
    values = np.full(n, np.nan)
    values[found] = np.asarray(pc.fill_null(metrics.items, np.nan).to_numpy())[hits[::-1][where]]
    chosen = last[~np.isnan(values[last])]
    return steps[chosen].tolist(), values[chosen].tolist()
