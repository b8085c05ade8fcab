"""The training series a report shows (loss, learning rates), read once while verifying."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ledger._arrow import int64_values, map_entries, string_codes
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
    loss, lr = step_metrics(table, ("loss", "lr"))
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


def step_metrics(table: pa.Table, keys: tuple[str, ...]) -> list[Series]:
    """For each metric in ``keys``, (steps, values) by step, ascending, of the step entries: of each
    step its last row's value, where that row logs one that is not NaN (a row logging a key twice:
    the last one). Read from the Arrow buffers."""
    steps = int64_values(table["step"])
    rows = np.flatnonzero(string_codes(table["kind"], [Kind.STEP.label]) == 0)
    _, first_reversed = np.unique(steps[rows][::-1], return_index=True)
    last = rows[len(rows) - 1 - first_reversed]  # each step's last row, by step
    entry_rows, codes, entry_values = map_entries(table["metrics"], keys)
    out: list[Series] = []
    for code in range(len(keys)):
        mine = codes == code
        found, where = np.unique(entry_rows[mine][::-1], return_index=True)  # a row's last entry of the key
        values = np.full(table.num_rows, np.nan)
        values[found] = entry_values[mine][::-1][where]
        chosen = last[~np.isnan(values[last])]
        out.append((steps[chosen].tolist(), values[chosen].tolist()))
    return out
