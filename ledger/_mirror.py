"""What an MLflow mirror of a ledger holds: the contract the mirror (``ledger.hooks.mlflow``) writes by
and the ``mlflow`` check (``ledger.verify``) compares by (docs/FORMAT.md §12, docs/VERIFYING.md).

Pure functions of the ledger's values; no ``mlflow`` import. Both sides derive the same keys and
values from the same entries, so whatever the check expects is what an honest mirror wrote.
"""

from __future__ import annotations

import math
import posixpath
import re
import sys
from collections.abc import Mapping
from typing import Any

PARAM_CHARS = 6000  # MLflow's limit on a param value: the mirror cuts values to it
TAG_CHARS = 8000  # MLflow's limit on a tag value
KEY_CHARS = 250  # MLflow's limit on a metric or param name
MLFLOW_MAX = sys.float_info.max  # MLflow's SQL store writes ±inf as ±this
OWNED_TAGS = ("ledger.run_id", "ledger.key_id", "ledger.format", "ledger.head", "ledger.entries",
              "ledger.mirrored_seq", "ledger.owned")
# MLflow's rule for metric and param names (mlflow.utils.validation, POSIX servers): slashes, word
# characters, periods, dashes, spaces and colons; a normalised relative path; at most 250 characters
_NAME = re.compile(r"[/\w.\- :]*")


def is_head_file(name: str) -> bool:
    """A signed tree head or its timestamp beside a ledger: ``heads/<size>.note`` / ``<size>.tsr``
    (docs/FORMAT.md §13), the only files of ``heads/`` a mirror uploads and a verifier downloads."""
    stem, dot, suffix = name.partition(".")
    return bool(dot) and suffix in ("note", "tsr") and stem.isascii() and stem.isdigit() and len(stem) <= 20


def accepts_name(name: str) -> bool:
    """True when MLflow accepts ``name`` as a metric or param key. A name it refuses cannot be
    mirrored: the mirror leaves it out, and the check expects it absent."""
    if not name or len(name) > KEY_CHARS or _NAME.fullmatch(name) is None:
        return False
    norm = posixpath.normpath(name)
    return norm == name and norm != "." and not norm.startswith(("..", "/"))


def params_of(config: Any, seed: Any = None) -> dict[str, str]:
    """Genesis ``config`` as MLflow params: nested non-empty maps joined with ``.``, every other value
    as ``str(v)`` cut to :data:`PARAM_CHARS`, and ``ledger.seed``; names MLflow refuses left out."""
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        for key, item in value.items():
            name = f"{prefix}{key}"
            if isinstance(item, Mapping) and item:
                walk(item, name + ".")
            elif accepts_name(name):
                out[name] = str(item)[:PARAM_CHARS]

    if isinstance(config, Mapping):
        walk(config, "")
    out["ledger.seed"] = str(seed)
    return out


def as_stored(value: float) -> float:
    """A metric value as MLflow's SQL store keeps it: ±inf becomes ±1.797e308 (NaN stays NaN)."""
    if math.isinf(value):
        return MLFLOW_MAX if value > 0 else -MLFLOW_MAX
    return value
