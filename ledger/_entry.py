"""The in-memory form of one ledger entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ledger._encoding import decode_body
from ledger._record import HEADER_SIZE, Header, Kind, decode_header, entry_hash


@dataclass(frozen=True, slots=True)
class Entry:
    """One signed entry: its exact record bytes, signature and signer's key id.

    Everything else (header fields, body, hash) is derived from the record bytes.
    """

    record: bytes
    signature: bytes
    key_id: bytes

    @property
    def header(self) -> Header:
        """The decoded fixed header."""
        return decode_header(self.record)

    @property
    def seq(self) -> int:
        """Position in the chain, 0-based."""
        return self.header.seq

    @property
    def kind(self) -> Kind:
        """Entry kind."""
        return self.header.kind

    @property
    def step(self) -> int:
        """Optimizer step the entry describes (−1: the init state)."""
        return self.header.step

    @property
    def time_ns(self) -> int:
        """Wall-clock time of writing, ns since the Unix epoch."""
        return self.header.time_ns

    @property
    def prev_hash(self) -> bytes:
        """Entry hash of the previous entry."""
        return self.header.prev_hash

    @property
    def hash(self) -> bytes:
        """This entry's hash (RFC 9162 leaf hash of the record bytes)."""
        return entry_hash(self.record)

    @property
    def body_bytes(self) -> bytes:
        """The CBOR body exactly as signed."""
        return self.record[HEADER_SIZE:]

    def body(self) -> dict[str, Any]:
        """Decode the body (checks its deterministic encoding)."""
        return decode_body(self.body_bytes)

    def metrics(self) -> dict[str, float]:
        """The body's ``metrics`` map (empty when absent)."""
        return dict(self.body().get("metrics", {}))
