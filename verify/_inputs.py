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
import threading
from pathlib import Path

from ledger._fingerprint import safetensors_digests
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


class ModelDigests:
    """The ``tensor/v1`` digests of the ``--model`` file, hashed in a background thread from the
    moment the inputs are checked, so the hashing overlaps loading the ledger and the checks before
    ``model``. :meth:`result` waits for them (raising what the hashing raised, in the caller's
    thread); :meth:`cancel` stops a hashing nobody will read (a ledger in another digest scheme)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Start hashing ``path`` (a safetensors file or sharded index)."""
        self.path = Path(path)
        self._cancel = threading.Event()
        self._digests: dict[str, bytes] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ledger-model-digests", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._digests = safetensors_digests(self.path, cancel=self._cancel)
        except BaseException as exc:  # handed to result(), in the thread that reads it
            self._error = exc

    def result(self) -> dict[str, bytes]:
        """The digests, once hashed (what the hashing raised, raised again here)."""
        self._thread.join()
        if self._error is not None:
            raise self._error.with_traceback(None)
        assert self._digests is not None
        return self._digests

    def cancel(self) -> None:
        """Stop the hashing and wait until its threads have (each finishes the chunk it is reading);
        :meth:`result` then raises unless the hashing had finished."""
        self._cancel.set()
        self._thread.join()


__all__ = ["ModelDigests", "require_file"]
