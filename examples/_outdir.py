"""The examples' output folder: recreated on every run, but only if an example made it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

MARKER = ".training-ledger-example"


def fresh_output(path: Path) -> Path:
    """Empty ``path`` for a new run. A folder an example wrote before (it holds the marker file) is
    removed; any other non-empty folder is refused, so nothing else is ever deleted."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            sys.exit(f"{path} exists and was not written by an example; choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by a training-ledger example; removed when the example runs again\n")
    return path
