"""``ledger prove``, ``ledger verify-proof`` and ``ledger consistency`` (docs/FORMAT.md §13).

Exit codes as for every command: 0 the proof holds, 1 it does not (a forged entry or head, a
fork), 2 could not run (a hostile or malformed file, a missing input, no head covering the entries).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

import click

from ledger._io import read_regular
from ledger._merkle import SubtreeCache
from ledger._note import MAX_NOTE_BYTES, TreeHead, open_note, origin_of
from ledger._proofs import (
    MAX_PROOF_BYTES,
    ConsistencyProof,
    InclusionProof,
    Outcome,
    check_consistency,
    check_inclusion,
    make_consistency,
    make_inclusion,
    parse_proof,
)
from ledger._text import printable
from ledger.errors import ConfigurationError, FormatError

EXIT_PASS, EXIT_FAIL = 0, 1


def _public(key: str | None, genesis: dict[str, Any] | None) -> tuple[bytes, bool]:
    """The key to check heads with: the given one, else the genesis key (then not authenticated)."""
    from ledger._crypto import load_public_key

    if key is not None:
        return load_public_key(key).raw, True
    embedded = genesis.get("public_key") if genesis else None
    if not isinstance(embedded, bytes) or len(embedded) != 32:
        raise ConfigurationError("no --key given and the ledger's genesis carries no public key")
    return embedded, False


def _fail(line: str) -> None:
    click.echo(f"FAIL: {printable(line)}")
    sys.exit(EXIT_FAIL)


def _read_note(path: str, public: bytes, origin: str) -> TreeHead:
    """A head file: parsed strictly (exit 2 if it is not one, or of another ledger), signed by
    ``public`` (exit 1 if not)."""
    try:
        head, verified = open_note(read_regular(path, what="head file", limit=MAX_NOTE_BYTES,
                                                error=ConfigurationError), public)
    except FileNotFoundError:
        raise ConfigurationError(f"{path} does not exist") from None
    except FormatError as exc:
        raise ConfigurationError(f"{path} is not a signed tree head: {exc}") from None
    if head.origin != origin:
        raise ConfigurationError(f"{path} is a head of {head.origin[:80]!r}, not of this ledger ({origin!r})")
    if not verified:
        _fail(f"{path} (a head of {head.size} entries) is not signed by the key")
    return head


def _load(ledger_path: str, key: str | None) -> tuple[Any, bytes, bool, str]:
    from ledger._reader import Ledger
    from ledger.verify._load import load

    loaded = load(Ledger(ledger_path))
    if loaded.errors or not loaded.hashes:
        reasons = "; ".join(f"{name}: {why}" for name, why in loaded.errors) or "no entries"
        raise FormatError(f"{ledger_path} cannot be read whole ({reasons}); run `ledger verify`")
    run_id = loaded.genesis.get("run_id") if loaded.genesis else None
    if not isinstance(run_id, str):
        raise FormatError(f"{ledger_path}: the genesis names no run id")
    try:
        origin_of(run_id)
    except FormatError as exc:
        raise ConfigurationError(f"{ledger_path} carries no signed tree heads: {exc}") from None
    public, given = _public(key, loaded.genesis)
    return loaded, public, given, run_id


def _heads(ledger_path: str, loaded: Any, public: bytes, run_id: str, tree: SubtreeCache) -> dict[int, bytes]:
    """Every head of the ledger signed by ``public`` (checkpoint entries and heads/), by size;
    exits 1 naming the size when the ledger does not extend one (a fork, or a ledger cut short)."""
    from ledger._heads import list_heads
    from ledger._note import note_from_signature

    origin, n = origin_of(run_id), len(loaded.hashes)
    found: dict[int, list[tuple[bytes, TreeHead, str]]] = {}
    for size, note in list_heads(ledger_path):
        try:  # name, size and origin first; one signature check last
            head = open_note(note, None)[0]
            if head.origin == origin and head.size == size and open_note(note, public)[1]:
                found.setdefault(size, []).append((note, head, f"heads/{size}.note"))
        except FormatError:  # not a head at all: not one the key signed (verify's heads check names it)
            continue
    for seq, recorded in _recorded(loaded):
        head = TreeHead(origin, recorded.size, recorded.root)
        note = note_from_signature(head, public, recorded.signature)
        if recorded.size == seq and open_note(note, public)[1]:
            found.setdefault(seq, []).append((note, head, f"checkpoint seq {seq}"))
    roots = {s: tree.root(0, s) for s in found if s <= n}
    for size, heads in sorted(found.items()):
        for _, head, where in heads:
            if size > n:
                _fail(f"the head of {size} entries ({where}) is signed by the key but the ledger holds {n}: it was "
                      "cut short, or forked")
            if head.root != roots[size]:
                _fail(f"fork at size {size}: the ledger does not extend the head signed in {where}")
    return {size: heads[0][0] for size, heads in found.items()}


def _recorded(loaded: Any) -> list[tuple[int, Any]]:
    from ledger._encoding import decode_body
    from ledger._record import HEADER_SIZE, Kind
    from ledger._schema import RecordedHead
    from ledger.verify._load import header_field

    headers, _ = loaded.headers()
    out = []
    for seq in (header_field(headers, "kind") == Kind.CHECKPOINT).nonzero()[0].tolist():
        body = decode_body(loaded.records[seq][HEADER_SIZE:])
        head = RecordedHead.from_body(body.get("tree_head") if isinstance(body, dict) else None)
        if head is not None:
            out.append((seq, head))
    return out


def _write(out: str, data: bytes) -> None:
    from ledger._layout import create_file, unlink_quietly

    target = Path(out)
    if target.is_dir() or target.is_symlink():
        raise ConfigurationError(f"--out {out} is a directory or a symlink; name a file")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        create_file(tmp, data)
        os.replace(tmp, target)
    except OSError as exc:
        unlink_quietly(tmp)
        raise ConfigurationError(f"cannot write {out}: {exc.strerror or exc}") from None


@click.command(name="prove")
@click.argument("ledger_path", metavar="LEDGER", type=click.Path())
@click.option("--seq", "seqs", multiple=True, type=click.IntRange(min=0), help="An entry to prove (repeatable).")
@click.option("--consistency-from", "old_path", metavar="OLD_HEAD", type=click.Path(),
              help="Prove instead that the ledger's newest signed head extends this earlier head (a .note file).")
@click.option("--out", required=True, type=click.Path(), help="The proof file to write (JSON).")
@click.option("--key", type=click.Path(), help="The trainer's public key (default: the one in genesis).")
def prove(ledger_path: str, seqs: tuple[int, ...], old_path: str | None, out: str, key: str | None) -> None:
    """Write a self-contained proof: entries (--seq) in, or an earlier head (--consistency-from)
    extended by, the newest signed tree head of the ledger; `ledger verify-proof` checks it."""
    if bool(seqs) == bool(old_path):
        raise click.UsageError("give --seq N (one or more) or --consistency-from OLD_HEAD")
    loaded, public, _, run_id = _load(ledger_path, key)
    tree = SubtreeCache(loaded.hashes)
    n, heads = len(loaded.hashes), _heads(ledger_path, loaded, public, run_id, tree)
    if not heads:
        raise ConfigurationError(f"{ledger_path} holds no signed tree heads (written before heads were recorded)")
    size = max(heads)
    proof: InclusionProof | ConsistencyProof
    if old_path is not None:
        old = _read_note(old_path, public, origin_of(run_id))
        _require_extends(old, old_path, tree)
        if old.size > size:
            raise ConfigurationError(f"{old_path} has {old.size} entries, more than the newest signed head of the "
                                     f"ledger ({size}): there is no newer head to prove it against yet")
        proof = make_consistency(run_id, read_regular(old_path, what="head file", limit=MAX_NOTE_BYTES),
                                 old.size, heads[size], size, loaded.hashes, tree)
        what = f"the head of {size} entries extends the head of {old.size}"
    else:
        beyond = [s for s in seqs if s >= n]
        if beyond:
            raise ConfigurationError(f"seq {beyond[0]} is not in the ledger ({n} entries, seq 0 to {n - 1})")
        if max(seqs) >= size:
            raise ConfigurationError(f"no signed tree head covers seq {max(seqs)}: the newest covers seq 0 to "
                                     f"{size - 1} ({_next_head(loaded, n)})")
        signatures = {s: loaded.table["signature"][s].as_py() for s in seqs}
        proof = make_inclusion(run_id, heads[size], size, loaded.hashes, loaded.records, signatures, list(seqs),
                               tree)
        what = f"{len(set(seqs))} entr{'y' if len(set(seqs)) == 1 else 'ies'} in the signed head of {size} entries"
    data = proof.to_json()
    _write(out, data)
    click.echo(f"wrote {printable(out)} ({len(data)} bytes): {what}")


def _next_head(loaded: Any, n: int) -> str:
    """Where the head that would cover the newest entries comes from."""
    from ledger._record import Kind, decode_header

    if decode_header(loaded.records[n - 1]).kind is Kind.SEAL:
        return (f"the ledger is sealed but its final head heads/{n}.note is missing: the writer stopped before "
                "writing it; reopening the ledger with the trainer's key (LedgerWriter.open) writes it")
    return "the next comes with the next checkpoint, or the seal"


def _require_extends(old: TreeHead, old_path: str, tree: SubtreeCache) -> None:
    """Exit 1 unless the ledger's first ``old.size`` entries have the old head's root."""
    if old.size > len(tree.leaves):
        _fail(f"{old_path} states {old.size} entries but the ledger holds {len(tree.leaves)}: it was cut short, or "
              "forked")
    if tree.root(0, old.size) != old.root:
        _fail(f"fork at size {old.size}: the ledger does not extend the head in {old_path}")


def show_outcome(outcome: Outcome, as_json: bool, run_id: str = "") -> None:
    """Print what a proof showed: the head(s), the proved entries decoded, the verdict (naming the
    run the proof is of). Every text line goes through :func:`printable` (entries are the trainer's
    and can hold terminal escapes)."""
    import json

    head = outcome.head
    entries = [{**{k: e[k] for k in ("seq", "kind", "step", "time_ns")}, "metrics": _plain(e["body"].get("metrics"))
                if isinstance(e["body"], dict) else None, "fields": _fields(e["body"])} for e in outcome.entries]
    if as_json:
        click.echo(json.dumps({"verdict": "pass" if outcome.ok else "fail", "fork": outcome.fork, "run_id": run_id,
                               "head": _head(head), "old_head": _head(outcome.old_head) if outcome.old_head else None,
                               "entries": entries, "problems": list(outcome.problems)}, indent=2, default=str))
        return
    lines = [f"head: {head.origin}, {head.size} entries, root {head.root.hex()}"]
    if outcome.old_head is not None:
        lines.append(f"old head: {outcome.old_head.size} entries, root {outcome.old_head.root.hex()}")
    for e in entries:
        metrics = " ".join(f"{k}={v}" for k, v in (e["metrics"] or {}).items())
        lines.append(f"seq {e['seq']}: {e['kind']} at step {e['step']}: {metrics or ', '.join(e['fields'])}")
    lines.extend(f"  {problem}" for problem in outcome.problems)
    if outcome.ok:
        shown = f"{len(entries)} entr{'y is' if len(entries) == 1 else 'ies are'} in the signed tree head of " \
            f"{head.size} entries" \
            if outcome.old_head is None else \
            f"the signed tree head of {head.size} entries extends the signed head of {outcome.old_head.size}"
        lines.append(f"PASS: {shown} of run {run_id!r} ({head.origin})")
    else:
        lines.append(f"FAIL: {'fork: ' if outcome.fork else ''}{outcome.problems[0]}")
    for line in lines:
        click.echo(printable(line))


def _head(head: TreeHead | None) -> dict[str, Any] | None:
    return None if head is None else {"origin": head.origin, "size": head.size, "root": head.root.hex()}


def _plain(metrics: Any) -> dict[str, Any] | None:
    if not isinstance(metrics, dict):
        return None
    return {str(k): v for k, v in list(metrics.items())[:256]
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _fields(body: Any) -> list[str]:
    return sorted(str(k) for k in body)[:64] if isinstance(body, dict) else []


@click.command(name="verify-proof")
@click.argument("proof_path", metavar="FILE", type=click.Path())
@click.option("--key", required=True, type=click.Path(), help="The trainer's public key (PEM).")
@click.option("--run-id", "run_id", help="The run the proof must be of (the key may sign many runs: without "
              "it, the verdict names the run the proof states).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_proof(proof_path: str, key: str, run_id: str | None, as_json: bool) -> None:
    """Check a proof file with the trainer's public key alone, and print what it proves."""
    from ledger._crypto import load_public_key

    public = load_public_key(key).raw
    try:
        proof = parse_proof(read_regular(proof_path, what="proof file", limit=MAX_PROOF_BYTES,
                                         error=ConfigurationError))
        if run_id is not None and proof.run_id != run_id:
            _fail(f"the proof is of run {proof.run_id[:200]!r}, not of run {run_id[:200]!r} (--run-id)")
        outcome = check_inclusion(proof, public) if isinstance(proof, InclusionProof) else \
            check_consistency(proof, public)
    except FileNotFoundError:
        raise ConfigurationError(f"{proof_path} does not exist") from None
    except FormatError as exc:
        raise ConfigurationError(f"{proof_path} is not a valid proof file: {exc}") from None
    show_outcome(outcome, as_json, proof.run_id)
    sys.exit(EXIT_PASS if outcome.ok else EXIT_FAIL)


@click.command(name="consistency")
@click.argument("old_path", metavar="OLD_HEAD", type=click.Path())
@click.argument("ledger_path", metavar="LEDGER", type=click.Path())
@click.option("--key", type=click.Path(), help="The trainer's public key (default: the one in genesis).")
def consistency(old_path: str, ledger_path: str, key: str | None) -> None:
    """Check that LEDGER extends an earlier published head (a .note file): exit 0 if it does, 1 for
    a fork or a ledger cut short."""
    loaded, public, given, run_id = _load(ledger_path, key)
    old, n = _read_note(old_path, public, origin_of(run_id)), len(loaded.hashes)
    _require_extends(old, old_path, SubtreeCache(loaded.hashes))
    note = "" if given else " (checked with the key in genesis: signer not authenticated; pass --key)"
    click.echo(f"PASS: the ledger ({n} entries) extends the signed head of {old.size} entries{note}")
