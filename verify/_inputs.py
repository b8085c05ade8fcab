"""The weight files a verifier is handed (``--model``, ``--base``, ``--against``, ``ledger compare``):
refused before any reader opens them when they cannot be read safely.

:func:`require_file` is for the path the user named: not a regular file (a FIFO, a device, a
directory) is the caller's mistake, :class:`~ledger.ConfigurationError` (exit 2).
:func:`check_weights` is for what the file holds, run inside the check that reads it: a sharded
``*.index.json`` whose ``weight_map`` is not a map of tensor names to shard files beside it, or a
shard that is not a regular file, is damaged evidence, :class:`~ledger.FormatError` (a failed check
naming the file). Neither follows a shard name out of the index's directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ledger._io import MiB, open_regular, read_regular
from ledger.errors import ConfigurationError, FormatError

INDEX_LIMIT = 64 * MiB  # an index lists tensor names: a few MiB for the largest published models


def require_file(path: str | os.PathLike[str], what: str) -> None:
    """Raise ConfigurationError unless ``path`` names an existing regular file (not a FIFO, a
    device or a directory); nothing is read."""
    try:
        with open_regular(path, what=what, error=ConfigurationError):
            pass
    except FileNotFoundError:
        raise ConfigurationError(f"{what} {os.fsdecode(path)} does not exist") from None


def shard_files(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, validated (FormatError naming the index)."""
    raw = read_regular(index, what="safetensors index", limit=INDEX_LIMIT)
    try:
        weight_map = json.loads(raw)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise FormatError(f"{index} is not a safetensors index (no weight_map: {type(exc).__name__})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index}: weight_map is a {type(weight_map).__name__}, not a non-empty map of tensor "
                          "names to shard files")
    names = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise FormatError(f"{index}: weight_map names {shard!r} for tensor {tensor!r}, not a file beside the index")
        names.add(shard)
    return [index.parent / name for name in sorted(names)]


def check_weights(path: str | os.PathLike[str], what: str = "weights file") -> None:
    """Raise FormatError when the weights at ``path`` cannot be read safely: a malformed index, a
    shard that is missing or not a regular file. Safetensors headers are validated by the reader."""
    path = Path(path)
    files = shard_files(path) if path.name.endswith(".index.json") else [path]
    for file in files:
        try:
            with open_regular(file, what=what):
                pass
        except FileNotFoundError:
            raise FormatError(f"{what} {file} (named by {path.name}) does not exist") from None


__all__ = ["check_weights", "require_file", "shard_files"]
