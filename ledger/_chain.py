"""The chain and its signatures, checked entry by entry before a writer acts on what a ledger says.

:func:`check_chain` is what ``Recorder.resume`` runs before it deletes or restores anything a
ledger names: seq contiguous from 0, each ``prev_hash`` the previous entry's hash, one run id, the
genesis key, and every signature valid under the key the caller trusts. The verifier's ``chain``
and ``signatures`` checks report the same properties over Arrow columns for a whole report; this
function stops at the first break and raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from ledger._crypto import key_id, verify_many
from ledger._entry import Entry
from ledger._record import ZERO_HASH, Kind, run_digest
from ledger.errors import FormatError


class ChainBreak(FormatError):
    """Entries that do not form one chain (what :func:`linked` raises)."""


def linked(entries: Iterable[Entry]) -> Iterator[Entry]:
    """The entries in order, each checked as it comes to have its position as seq and to link to
    the one before (``prev_hash``); :class:`ChainBreak` naming the seq at the first that does not:
    two entries with one seq, one missing, or a broken link — a fork or an edit."""
    prev = ZERO_HASH
    for position, entry in enumerate(entries):
        header = entry.header
        if header.seq != position:
            what = "two entries with" if header.seq < position else "an entry missing before"
            raise ChainBreak(f"{what} seq {min(header.seq, position)}")
        if header.prev_hash != prev:
            raise ChainBreak(f"entry {position} does not link to entry {position - 1} (prev_hash differs)")
        yield entry
        prev = entry.hash


def check_chain(entries: Sequence[Entry], public_raw: bytes) -> None:
    """Raise :class:`FormatError` naming the first entry (by seq) that breaks the chain, is not the
    run's, or whose signature does not verify under the raw Ed25519 key ``public_raw``, which must
    be the key genesis declares. Returns when every entry is intact."""
    if not entries:
        raise FormatError("the ledger holds no entries")
    genesis = entries[0]
    if genesis.kind is not Kind.GENESIS:
        raise FormatError("entry seq 0 is not a genesis")
    body = genesis.body()
    if body.get("public_key") != public_raw:
        raise FormatError("the ledger's genesis declares another public key than the key given")
    run_id = body.get("run_id")
    if not isinstance(run_id, str):
        raise FormatError("the ledger's genesis has no run id")
    digest, kid = run_digest(run_id), key_id(public_raw)
    for position, entry in enumerate(linked(entries)):
        header = entry.header
        if header.run_digest != digest:
            raise FormatError(f"entry seq {position} belongs to another run (run digest differs from genesis)")
        if entry.key_id != kid:
            raise FormatError(f"entry seq {position} names another signing key than genesis")
        if position and header.kind is Kind.GENESIS:
            raise FormatError(f"entry seq {position} is a second genesis")
    bad = verify_many(public_raw, [e.record for e in entries], [e.signature for e in entries])
    if bad:
        raise FormatError(f"entry seq {entries[bad[0]].seq} has an invalid signature "
                          f"({len(bad)} entr{'y' if len(bad) == 1 else 'ies'} in all): the ledger was altered")


__all__ = ["ChainBreak", "check_chain", "linked"]
