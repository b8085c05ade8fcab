"""Proof files: entries of a ledger proved against a signed tree head, and one head proved to
extend another, checkable with the trainer's public key alone (docs/FORMAT.md §13.3).

A proof file is one JSON object (UTF-8, at most :data:`MAX_PROOF_BYTES`), byte strings in
standard base64, heads as their signed-note text:

- inclusion: ``{"proof": INCLUSION, "run_id", "head", "entries": [{"seq", "record", "signature",
  "path"}]}`` — each entry's record and DSSE signature, and its RFC 9162 audit path in the head's tree;
- consistency: ``{"proof": CONSISTENCY, "run_id", "old_head", "head", "path"}``.

Parsing is strict (exact keys, types, canonical base64, no duplicate keys, bounded counts);
checking never needs the ledger.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ledger._crypto import verify_raw
from ledger._encoding import decode_body
from ledger._merkle import (
    MAX_CONSISTENCY,
    MAX_PATH,
    SubtreeCache,
    consistency_proof,
    inclusion_proof,
    verify_consistency,
    verify_inclusion,
)
from ledger._note import MAX_NOTE_BYTES, MAX_ORIGIN_BYTES, TreeHead, open_note, origin_of
from ledger._record import HEADER_SIZE, MAX_RECORD_BYTES, decode_header, entry_hash, run_digest
from ledger.errors import FormatError

INCLUSION = "training-ledger/inclusion-proof/v1"
CONSISTENCY = "training-ledger/consistency-proof/v1"
MAX_PROVED = 4096  # entries in one inclusion proof
MAX_PROVED_BYTES = 128 << 20  # of records in one inclusion proof
# the records as base64 (4/3), plus 16 MiB for signatures, audit paths, heads and indentation
MAX_PROOF_BYTES = MAX_PROVED_BYTES // 3 * 4 + (16 << 20)
# JSON structure ('[', '{', ',', ':') a proof of MAX_PROVED entries can hold: per entry 4 keys and a
# path of up to MAX_PATH hashes, and whatever the two notes and the run id hold as text. Counted
# before parsing, so a file of nested empty lists cannot make millions of Python objects.
MAX_STRUCTURE = MAX_PROVED * (MAX_PATH + 16) + 2 * MAX_NOTE_BYTES + 4 * MAX_ORIGIN_BYTES


@dataclass(frozen=True, slots=True)
class ProvedEntry:
    """One entry of an inclusion proof: its seq, record bytes, signature and audit path."""

    seq: int
    record: bytes
    signature: bytes
    path: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Entries of run ``run_id`` proved to be in the tree that the signed note ``head`` states."""

    run_id: str
    head: bytes
    entries: tuple[ProvedEntry, ...]

    def to_json(self) -> bytes:
        """The proof file's bytes (stable: fixed key order, one space indent, final newline)."""
        return _dump({"proof": INCLUSION, "run_id": self.run_id, "head": self.head.decode(),
                      "entries": [{"seq": e.seq, "record": _b64(e.record), "signature": _b64(e.signature),
                                   "path": [_b64(p) for p in e.path]} for e in self.entries]})


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """The signed note ``head`` proved to extend the signed note ``old_head``."""

    run_id: str
    old_head: bytes
    head: bytes
    path: tuple[bytes, ...]

    def to_json(self) -> bytes:
        """The proof file's bytes."""
        return _dump({"proof": CONSISTENCY, "run_id": self.run_id, "old_head": self.old_head.decode(),
                      "head": self.head.decode(), "path": [_b64(p) for p in self.path]})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What checking a proof found: ``ok``; ``problems`` (one line each); ``fork`` when two heads
    signed by the key disagree; the heads; the proved entries decoded (seq, kind, step, time_ns, body)."""

    ok: bool
    head: TreeHead
    problems: tuple[str, ...] = ()
    fork: bool = False
    old_head: TreeHead | None = None
    entries: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _dump(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()


def make_inclusion(run_id: str, head_note: bytes, size: int, hashes: Sequence[bytes], records: Sequence[bytes],
                   signatures: Sequence[bytes] | Mapping[int, bytes], seqs: Sequence[int],
                   tree: SubtreeCache | None = None) -> InclusionProof:
    """An inclusion proof of entries ``seqs`` in the tree of the first ``size`` entry hashes."""
    if not seqs or len(set(seqs)) > MAX_PROVED:
        raise FormatError(f"prove 1 to {MAX_PROVED} entries")
    tree = tree or SubtreeCache(hashes)  # the subtrees the proofs share are hashed once
    entries = tuple(ProvedEntry(seq, bytes(records[seq]), bytes(signatures[seq]),
                                tuple(inclusion_proof(hashes, seq, size, tree))) for seq in sorted(set(seqs)))
    return InclusionProof(run_id, head_note, entries)


def make_consistency(run_id: str, old_note: bytes, old_size: int, head_note: bytes, size: int,
                     hashes: Sequence[bytes], tree: SubtreeCache | None = None) -> ConsistencyProof:
    """A consistency proof from the head of ``old_size`` entries to the head of ``size``."""
    return ConsistencyProof(run_id, old_note, head_note, tuple(consistency_proof(hashes, old_size, size, tree)))


# ------------------------------------------------------------------------ strict parsing
def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise FormatError("the proof repeats a key")
    return out


def _keys(obj: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != keys:
        raise FormatError(f"{what} is not an object with exactly the keys {', '.join(sorted(keys))}")
    return obj


def _bytes(value: Any, what: str, size: int | None = None, limit: int = MAX_RECORD_BYTES) -> bytes:
    if not isinstance(value, str) or len(value) > (limit + 2) // 3 * 4:
        raise FormatError(f"{what} is not a base64 string of at most {limit} bytes")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise FormatError(f"{what} is not standard base64") from None
    if _b64(raw) != value or (size is not None and len(raw) != size):
        raise FormatError(f"{what} is not canonical base64" + ("" if size is None else f" of {size} bytes"))
    return raw


def _path(value: Any, limit: int, what: str) -> tuple[bytes, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise FormatError(f"{what} is not a list of at most {limit} hashes")
    return tuple(_bytes(p, f"{what} hash", 32, 32) for p in value)


def _utf8(value: str, what: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, as JSON's \ud800 escape makes one
        raise FormatError(f"{what} is not valid Unicode text (a lone surrogate)") from None


def _note(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_NOTE_BYTES:
        raise FormatError(f"{what} is not a signed note")
    return _utf8(value, what)


def parse_proof(data: bytes) -> InclusionProof | ConsistencyProof:
    """Read a proof file strictly; :class:`FormatError` names what is wrong."""
    if len(data) > MAX_PROOF_BYTES:
        raise FormatError(f"a proof file is at most {MAX_PROOF_BYTES >> 20} MiB")
    structure = sum(data.count(c) for c in (b"[", b"{", b",", b":"))
    if structure > MAX_STRUCTURE:
        raise FormatError(f"the file holds {structure} JSON lists, objects and items, more than a proof of "
                          f"{MAX_PROVED} entries can")
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=lambda c: (_ for _ in ()).throw(FormatError(f"{c} is not JSON")))
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:  # ValueError: JSON errors, 4300+ digits
        raise FormatError(f"not a JSON proof file ({type(exc).__name__})") from None
    kind = obj.get("proof") if isinstance(obj, dict) else None
    if kind == INCLUSION:
        obj = _keys(obj, {"proof", "run_id", "head", "entries"}, "the proof")
        entries = obj["entries"]
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_PROVED:
            raise FormatError(f"'entries' is not a list of 1 to {MAX_PROVED} entries")
        proved, total, seen = [], 0, set()
        for i, item in enumerate(entries):
            item = _keys(item, {"seq", "record", "signature", "path"}, f"entries[{i}]")
            seq = item["seq"]
            if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 1 << 63:
                raise FormatError(f"entries[{i}].seq is not a non-negative integer")
            if seq in seen:
                raise FormatError(f"entries[{i}] repeats seq {seq}")
            seen.add(seq)
            record = _bytes(item["record"], f"entries[{i}].record")
            total += len(record)
            if total > MAX_PROVED_BYTES:
                raise FormatError(f"the proved records hold more than {MAX_PROVED_BYTES >> 20} MiB")
            proved.append(ProvedEntry(seq, record, _bytes(item["signature"], f"entries[{i}].signature", 64, 64),
                                      _path(item["path"], MAX_PATH, f"entries[{i}].path")))
        return InclusionProof(_run_id(obj), _note(obj["head"], "'head'"), tuple(proved))
    if kind == CONSISTENCY:
        obj = _keys(obj, {"proof", "run_id", "old_head", "head", "path"}, "the proof")
        return ConsistencyProof(_run_id(obj), _note(obj["old_head"], "'old_head'"), _note(obj["head"], "'head'"),
                                _path(obj["path"], MAX_CONSISTENCY, "'path'"))
    raise FormatError(f"not a proof file: 'proof' is not {INCLUSION!r} or {CONSISTENCY!r}")


def _run_id(obj: dict[str, Any]) -> str:
    if not isinstance(obj["run_id"], str) or not obj["run_id"]:
        raise FormatError("'run_id' is not a non-empty string")
    _utf8(obj["run_id"], "'run_id'")
    return str(obj["run_id"])


# ------------------------------------------------------------------------ checking
def _signed_head(note: bytes, run_id: str, public_raw: bytes, what: str) -> tuple[TreeHead, str | None]:
    """The head a note states, and why it cannot be trusted (None when it can)."""
    head, verified = open_note(note, public_raw)  # FormatError: not a note at all
    if head.origin != origin_of(run_id):
        return head, f"{what} is a head of {head.origin[:80]!r}, not of run {run_id[:80]!r}"
    if not verified:
        return head, f"{what} (size {head.size}) is not signed by the given key"
    return head, None


def check_inclusion(proof: InclusionProof, public_raw: bytes) -> Outcome:
    """Check every entry of an inclusion proof: signed by the key, of this run, at its seq, and
    on the audit path to the root of the head the key signed."""
    head, why = _signed_head(proof.head, proof.run_id, public_raw, "the head")
    if why:
        return Outcome(False, head, (why,))
    problems, decoded = [], []
    digest = run_digest(proof.run_id)
    for e in proof.entries:
        try:
            header = decode_header(e.record)
            body = decode_body(e.record[HEADER_SIZE:])
        except FormatError as exc:
            problems.append(f"seq {e.seq}: the record is not an entry ({exc})")
            continue
        if header.seq != e.seq or header.run_digest != digest:
            problems.append(f"seq {e.seq}: the record is entry {header.seq} of "
                            f"{'this' if header.run_digest == digest else 'another'} run")
        elif not verify_raw(public_raw, e.record, e.signature):
            problems.append(f"seq {e.seq}: the entry's signature does not verify with the given key")
        elif not verify_inclusion(e.seq, head.size, entry_hash(e.record), e.path, head.root):
            problems.append(f"seq {e.seq}: the audit path does not lead to the root of the signed head of "
                            f"{head.size} entries")
        else:
            decoded.append({"seq": header.seq, "kind": header.kind.label, "step": header.step,
                            "time_ns": header.time_ns, "body": body})
    return Outcome(not problems, head, tuple(problems), entries=tuple(decoded))


def check_consistency(proof: ConsistencyProof, public_raw: bytes) -> Outcome:
    """Check that the newer head extends the older one; both signed by the key, of this run. Two
    signed heads that disagree (same size, other root; or no valid proof) are a fork."""
    old, why_old = _signed_head(proof.old_head, proof.run_id, public_raw, "the old head")
    head, why = _signed_head(proof.head, proof.run_id, public_raw, "the head")
    if why_old or why:
        return Outcome(False, head, tuple(w for w in (why_old, why) if w), old_head=old)
    return extends(old, head, proof.path)


def extends(old: TreeHead, head: TreeHead, path: Sequence[bytes]) -> Outcome:
    """Whether ``head`` extends ``old`` by ``path`` (both already trusted)."""
    if old.size > head.size:
        return Outcome(False, head, (f"the old head has {old.size} entries, more than the head's {head.size}: give "
                                     "them in order",), old_head=old)
    if old.size == head.size and old.root != head.root:
        return Outcome(False, head, (f"fork at size {head.size}: two heads signed by the key state different "
                                     "roots",), fork=True, old_head=old)
    if not verify_consistency(old.size, head.size, old.root, head.root, path):
        return Outcome(False, head, (f"the head of {head.size} entries is not shown to extend the head of {old.size}: "
                                     "the consistency proof does not verify (a fork, or a damaged proof; `ledger "
                                     "consistency OLD_HEAD LEDGER` decides with the ledger)",), old_head=old)
    return Outcome(True, head, old_head=old)


__all__ = ["CONSISTENCY", "INCLUSION", "MAX_PROOF_BYTES", "ConsistencyProof", "InclusionProof", "Outcome",
           "ProvedEntry", "check_consistency", "check_inclusion", "extends", "make_consistency", "make_inclusion",
           "parse_proof"]
