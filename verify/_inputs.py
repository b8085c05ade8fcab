"""The weight files a verifier is handed (``--model``, ``--base``, ``--against``, ``ledger compare``):
refused before any reader opens them when they cannot be read safely.

:func:`require_file` is for the path the user named: not a regular file (a FIFO, a device, a
directory) is the caller's mistake, :class:`~ledger.ConfigurationError` (exit 2). What the file
holds is validated by the reader (:func:`ledger._fingerprint.read_shards`) inside the check that
reads it: a malformed index or header, or a shard that is missing or not a regular file, is damaged
evidence, :class:`~ledger.FormatError` (a failed check naming the file).
"""

from __future__ import annotations

import os

from ledger._io import open_regular
from ledger.errors import ConfigurationError


def require_file(path: str | os.PathLike[str], what: str) -> None:
    """Raise ConfigurationError unless ``path`` names an existing regular file (not a FIFO, a
    device or a directory); nothing is read."""
    try:
        with open_regular(path, what=what, error=ConfigurationError):
            pass
    except FileNotFoundError:
        raise ConfigurationError(f"{what} {os.fsdecode(path)} does not exist") from None


__all__ = ["require_file"]
