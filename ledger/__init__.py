"""training-ledger: a signed, hash-chained Parquet diary of a training run.

The everyday API is what ``__all__`` lists: keys, the reader (``ledger.open``), the writer for other
producers, recipes and the errors. Format primitives (hashes, encodings, typed bodies) are in
:mod:`ledger.format`; the training side is :mod:`ledger.hooks`, the checking side
:mod:`ledger.verify`, and everything that needs PyTorch :mod:`ledger.torch`. Modules starting with
``_`` are internal. ``import ledger`` never imports torch.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ledger._crypto import PublicKey, Signer, generate_keypair, load_public_key, load_signer
from ledger._entry import Entry
from ledger._reader import Ledger, open  # noqa: A004 - ledger.open is the public name
from ledger._recipe import Recipe, load_recipe
from ledger._record import Kind
from ledger.errors import (
    ConfigurationError,
    FormatError,
    KeyLoadError,
    LedgerError,
    LedgerLockedError,
    NotALedgerError,
    StorageError,
    VerificationError,
)

if TYPE_CHECKING:  # imported on first use (module __getattr__): reading and verifying never need the writer
    from ledger._writer import LedgerWriter, Recovery

__version__ = "0.1.0"

__all__ = [
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
    "StorageError",
    "VerificationError",
    "__version__",
    "generate_keypair",
    "load_public_key",
    "load_recipe",
    "load_signer",
    "open",
]

# Names that lived here before 0.2 and moved; they keep working one release, with a warning.
_MOVED = {name: "ledger.format" for name in ("FORMAT_VERSION", "PAYLOAD_TYPE", "decode_body", "encode_body",
                                             "entry_hash", "merkle_root", "pae")}
_MOVED["run_step"] = "ledger.torch"


_LAZY = {"LedgerWriter": "ledger._writer", "Recovery": "ledger._writer"}


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> Any:
    """The writer's names, imported on first use; old import paths of moved names (``ledger.pae`` →
    ``ledger.format.pae``), with a ``DeprecationWarning``; removed in the next release."""
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module 'ledger' has no attribute {name!r}")
    warnings.warn(f"ledger.{name} moved to {where}.{name}; the old name goes away in the next release",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(where), name)
