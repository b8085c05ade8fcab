"""The training series a report shows (loss, learning rates), read once while verifying."""

from __future__ import annotations

from typing import Any

import numpy as np
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
    last: dict[int, dict[str, float]] = {}
    for step, metrics in zip(rows["step"].to_pylist(), rows["metrics"].to_pylist(), strict=True):
        last[int(step)] = dict(metrics)
    steps = sorted(last)
    for name, key in (("loss", "loss"), ("lr", "lr")):
        xs = [s for s in steps if key in last[s] and not np.isnan(last[s][key])]
        if not xs:
            continue
        series: Series = (xs, [float(last[s][key]) for s in xs])
        if name == "loss":
            out["loss"] = series
        else:
            out["lrs"]["lr"] = series
    if out["loss"] is None:
        notes["loss"] = "no step entry logs a 'loss' metric"
    if not out["lrs"] and view is not None:  # no 'lr' metric: the per-group learning rates of the step bodies
        for s in sorted(view.steps):
            lrs = view.steps[s].lrs
            for g, lr in enumerate(lrs if lrs is not None else []):
                xs, ys = out["lrs"].setdefault(f"group {g}", ([], []))
                xs.append(s)
                ys.append(float(lr))
    if not out["lrs"]:
        notes["lrs"] = "no step entry logs an 'lr' metric or per-group learning rates"
    return out
