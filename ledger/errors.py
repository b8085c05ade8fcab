"""One error hierarchy for the whole package.

Every error raised on purpose is a :class:`LedgerError`; its ``exit_code`` is what the CLI exits with:

========================= ==== ====================================================================
error                     exit meaning
========================= ==== ====================================================================
``FormatError``           1    bytes of a ledger, checkpoint or weights file break the format:
                               damaged or crafted evidence (a verifier reports it as a failed check)
``VerificationError``     1    a verification failed (``Report.raise_if_failed``); carries the report
``ConfigurationError``    2    the caller's mistake: a bad argument, a missing input, a value that
                               cannot be encoded (and its subclasses below)
``StorageError``          2    the disk refused: a write, fsync or rename failed (full disk, no
                               permission); nothing already written was changed
anything else             3    a bug of ours
========================= ==== ====================================================================

Third-party exceptions are wrapped where they enter (pyarrow, cryptography, cbor2, OS errors).
"""

from __future__ import annotations

from typing import Any


class LedgerError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 2


class ConfigurationError(LedgerError):
    """The call could not run as asked: a bad argument, a missing input, a wrong path."""


class NotALedgerError(ConfigurationError):
    """The path exists but is not a ledger directory (or does not exist)."""


class KeyLoadError(ConfigurationError):
    """A key file is missing, unreadable, of the wrong type, or needs a passphrase."""


class LedgerLockedError(ConfigurationError):
    """Another writer holds the ledger's lock."""


class StorageError(LedgerError):
    """Writing to disk failed (ENOSPC, EACCES, EIO …): the operation could not run."""


class FormatError(LedgerError):
    """Bytes do not follow the ledger format (see docs/FORMAT.md).

    Raised by the pure encoders and decoders. A verifier turns it into a failed check: damaged
    ledger content is evidence, not a usage error.
    """

    exit_code = 1


class VerificationError(LedgerError):
    """A verification failed; carries the report that says which check and why."""

    exit_code = 1

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


__all__ = [
    "ConfigurationError",
    "FormatError",
    "KeyLoadError",
    "LedgerError",
    "LedgerLockedError",
    "NotALedgerError",
    "StorageError",
    "VerificationError",
]
