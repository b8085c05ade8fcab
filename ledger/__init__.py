"""training-ledger: a signed, hash-chained Parquet diary of a training run.

The public surface is what ``__all__`` lists; modules starting with ``_`` are internal.
``ledger`` never imports torch at import time (``ledger.hooks`` does the training side,
``ledger.verify`` the checking side).
"""

from __future__ import annotations

from ledger._crypto import PublicKey, Signer, generate_keypair, load_public_key, load_signer
from ledger._encoding import decode_body, encode_body
from ledger._entry import Entry
from ledger._reader import Ledger, open  # noqa: A004 - ledger.open is the public name
from ledger._recipe import Recipe, load_recipe, run_step
from ledger._record import FORMAT_VERSION, PAYLOAD_TYPE, Kind, entry_hash, merkle_root, pae
from ledger._writer import LedgerWriter, Recovery
from ledger.errors import (
    ConfigurationError,
    FormatError,
    KeyLoadError,
    LedgerError,
    LedgerLockedError,
    NotALedgerError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "PAYLOAD_TYPE",
    "ConfigurationError",
    "Entry",
    "FormatError",
    "KeyLoadError",
    "Kind",
    "Ledger",
    "LedgerError",
    "LedgerLockedError",
    "LedgerWriter",
    "NotALedgerError",
    "PublicKey",
    "Recipe",
    "Recovery",
    "Signer",
    "VerificationError",
    "__version__",
    "decode_body",
    "encode_body",
    "entry_hash",
    "generate_keypair",
    "load_recipe",
    "load_public_key",
    "load_signer",
    "merkle_root",
    "open",
    "pae",
    "run_step",
]
