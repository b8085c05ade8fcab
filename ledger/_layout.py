"""Where things live inside a ledger directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ledger.errors import NotALedgerError


@dataclass(frozen=True, slots=True)
class Layout:
    """Paths of one ledger directory."""

    root: Path

    @property
    def parts(self) -> Path:
        """Directory of immutable Parquet parts."""
        return self.root / "parts"

    @property
    def wal(self) -> Path:
        """The write-ahead log (open tail)."""
        return self.root / "wal.log"

    @property
    def manifest(self) -> Path:
        """The manifest (a convenience index; never trusted by verify)."""
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        """The writer's lock file."""
        return self.root / "writer.lock"

    def is_ledger(self) -> bool:
        """True when the directory looks like a ledger (has parts/ or a log)."""
        return self.root.is_dir() and (self.parts.is_dir() or self.wal.is_file())

    def require(self) -> Layout:
        """Return self, or raise :class:`NotALedgerError` with what to do."""
        if not self.root.exists():
            raise NotALedgerError(f"{self.root} does not exist")
        if not self.root.is_dir():
            raise NotALedgerError(f"{self.root} is a file, not a ledger directory")
        if not self.is_ledger():
            raise NotALedgerError(f"{self.root} is not a ledger (no parts/ and no wal.log inside)")
        return self
