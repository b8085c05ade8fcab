"""Integrity checks that need only the ledger: ``chain``, ``signatures`` and ``seal``.

The chain check works on the header bytes of every record with numpy (no body decoding), then
decodes the bodies it must (genesis, seal, and every body or a sample) to check the typed
columns against them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from ledger import _record
from ledger._arrow import fixed_rows, int64_values, pylist_at, string_codes
from ledger._crypto import PublicKey
from ledger._encoding import decode_body, floats_equal
from ledger._io import MiB, read_regular
from ledger._reader import Ledger
from ledger._record import HEADER_SIZE, Kind
from ledger._schema import SealBody
from ledger.errors import FormatError, LedgerError
from ledger.verify._context import Context
from ledger.verify._load import Records, header_field, links_broken, rows_differ
from ledger.verify._result import CheckResult, Status
from ledger.verify._signatures import bad_signatures

_MANIFEST_LIMIT = 16 * MiB  # one line per part: far more than any real manifest


def check_chain(ctx: Context) -> CheckResult:
    """Recompute every hash, check links, seq contiguity, run id, kinds and that the typed
    columns equal the record bytes; name the first bad entry by seq."""
    loaded, sample, rng, progress = ctx.loaded, ctx.options.sample, ctx.rng, ctx.progress
    t, n = loaded.table, len(loaded.records)
    problems: dict[int, list[str]] = {}

    def flag(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask)[:1000]:
            problems.setdefault(int(i), []).append(reason)

    if n == 0:
        reasons = [f"{name}: {reason}" for name, reason in loaded.errors] or ["the ledger holds no entries"]
        return CheckResult("chain", Status.FAIL, "; ".join(reasons), {"entries": 0, "first_bad_seq": 0})
    headers, lengths = loaded.headers()
    flag(lengths < HEADER_SIZE, f"record shorter than the {HEADER_SIZE}-byte header")
    version, kind, reserved = (header_field(headers, f) for f in ("version", "kind", "reserved"))
    seq, step, time_ns = (header_field(headers, f) for f in ("seq", "step", "time_ns"))
    run_dg, prev = header_field(headers, "run_digest"), header_field(headers, "prev_hash")
    hashes = np.frombuffer(loaded.joined_hashes(), dtype=np.uint8).reshape(n, 32)
    position = np.arange(n)
    flag(version > _record.FORMAT_VERSION, f"format version {int(version.max())}, newer than the version "
         f"{_record.FORMAT_VERSION} this verifier knows (upgrade training-ledger if the ledger is genuine; a damaged "
         "version field is a broken chain)")
    flag(version < _record.FORMAT_VERSION, f"unknown format version (expected {_record.FORMAT_VERSION})")
    flag(reserved != 0, "reserved header byte is not zero")
    flag(kind > max(Kind), "unknown entry kind")
    flag(seq != position, "seq is not contiguous here (an entry is missing, duplicated or moved)")
    flag(links_broken(prev, hashes), "prev_hash does not equal the previous entry's hash")
    flag((kind == Kind.GENESIS) & (position != 0), "a genesis entry after the first position")
    flag((kind == Kind.SEAL) & (position != n - 1), "entries follow the seal")
    if kind[0] != Kind.GENESIS:
        problems.setdefault(0, []).append("the first entry is not a genesis")
    # run id and signer: every entry names the genesis run and key
    if loaded.genesis is not None:
        run_id = str(loaded.genesis.get("run_id", ""))
        flag(rows_differ(run_dg, np.frombuffer(_record.run_digest(run_id), np.uint8)),
             "run-id digest differs from the genesis run (an entry from another run)")
        flag(string_codes(t["run_id"], [run_id]) != 0, "run_id column differs from genesis")
        gkid = loaded.genesis.get("key_id", b"")
        gkid_row = np.frombuffer(gkid if isinstance(gkid, bytes) and len(gkid) == 32 else bytes(32), np.uint8)
        flag(rows_differ(fixed_rows(t["key_id"]), gkid_row), "key_id column differs from the genesis key id")
    elif loaded.genesis_error:
        problems.setdefault(0, []).append(f"genesis unreadable: {loaded.genesis_error}")
    # typed columns against the header bytes
    flag(int64_values(t["seq"]) != seq, "seq column differs from the record header")
    flag(int64_values(t["step"]) != step, "step column differs from the record header")
    flag(int64_values(t["time_ns"]) != time_ns, "time_ns column differs from the record header")
    kinds_col = string_codes(t["kind"], [k.label for k in sorted(Kind)])  # index == kind code, -1 none
    flag(kinds_col != kind, "kind column differs from the record header")
    flag(rows_differ(fixed_rows(t["hash"]), hashes), "hash column differs from the hash of the record bytes")
    if progress:
        progress("chain", n, n)
    # bodies: genesis, seal and all others (or a sample) decoded and compared with the metrics column
    decode = list(range(n)) if sample is None else sorted({0, n - 1, *rng.sample(range(n), min(sample, n))})
    # past the first broken header or link the chain has failed: decoding the bodies that follow
    # cannot change the verdict or the first bad seq, and a hostile ledger could make it costly
    broken_at = min(problems, default=n)
    skipped = sum(1 for i in decode if i > broken_at)
    decode = [i for i in decode if i <= broken_at]
    records: Records | list[bytes] = loaded.records.materialize() if sample is None else loaded.records
    checked = len(decode)
    if sample is None:  # the bodies templates accepted: their metrics compared with the column at once
        decided, same = _accepted_metrics(ctx, n)
        for i in np.flatnonzero(decided[:broken_at + 1] & ~same[:broken_at + 1]).tolist():
            problems.setdefault(i, []).append("metrics column differs from the record body")
        decode = np.flatnonzero(~decided[:broken_at + 1]).tolist()
    column_metrics = pylist_at(t["metrics"], decode)
    for i, column in zip(decode, column_metrics, strict=True):
        if lengths[i] < HEADER_SIZE:
            continue
        try:
            body = decode_body(records[i][HEADER_SIZE:])
            if not _same_metrics(column, body.get("metrics", {})):
                problems.setdefault(i, []).append("metrics column differs from the record body")
        except FormatError as exc:
            problems.setdefault(i, []).append(f"body: {exc}")
        except (TypeError, ValueError, AttributeError, OverflowError, RecursionError, MemoryError) as exc:
            problems.setdefault(i, []).append(f"body could not be decoded ({type(exc).__name__}: {exc})")
    data: dict[str, Any] = {"entries": n, "bodies_decoded": checked}
    if skipped:
        data["bodies_not_decoded"] = skipped
    failures = [f"{name}: {reason}" for name, reason in loaded.errors]
    if problems or failures:
        bad = sorted(problems)
        data.update({"bad_entries": len(bad), "first_bad_seq": bad[0] if bad else n})
        where = f"first bad entry seq {bad[0]}: {'; '.join(problems[bad[0]])}" if bad else ""
        if failures:
            data["unreadable"] = [name for name, _ in loaded.errors]
            where = "; ".join(failures + ([where] if where else []))
            if not bad:
                data["first_bad_seq"] = n
                where += f" (entries from seq {n} on cannot be read)"
        return CheckResult("chain", Status.FAIL, where, data)
    sampled = "" if sample is None else f"; bodies decoded for {checked} of them (--sample)"
    return CheckResult("chain", Status.PASS, f"{n} entries linked from genesis to head {loaded.hashes[-1].hex()[:16]}…"
                       f", every hash recomputed{sampled}", data)


def _accepted_metrics(ctx: Context, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(decided, same) per entry: whether its body is one a template accepted (canonical, so it
    decodes; :attr:`RunView.accepted <ledger.verify._run.RunView.accepted>`) and its metrics column
    row holds each of the body's metric names once and nothing else, no null among them; and then
    whether the values are equal as :func:`_same_metrics` has them. The other entries are compared
    one by one."""
    decided, same = np.zeros(n, bool), np.zeros(n, bool)
    accepted = ctx.view.accepted if ctx.view is not None else ()
    names = sorted({name for block in accepted for name in block.names})
    entries = _metric_entries(ctx.loaded.table["metrics"], names) if accepted else None
    if entries is None:
        return decided, same
    starts, counts, codes, values = entries
    index = {name: i for i, name in enumerate(names)}
    for block in accepted:  # each costs its own rows × names (a hostile ledger may have many blocks, many names)
        k = len(block.names)
        counted = counts[block.positions] == k
        rows, want = block.positions[counted], block.values[counted]
        own = np.array([index[name] for name in block.names], dtype=np.int64)  # the body's names as codes
        order = np.argsort(own)
        at = starts[rows, None] + np.arange(k)
        found = np.minimum(np.searchsorted(own[order], codes[at]), max(k - 1, 0))
        slots = np.where(own[order][found] == codes[at], order[found], -1) if k else found  # -1: not the body's
        each_once = (np.sort(slots, axis=1) == np.arange(k)).all(axis=1)  # the body's names, none repeated
        got, want = values[at[each_once]], np.take_along_axis(want[each_once], slots[each_once], axis=1)
        equal = ((got == want) & (np.signbit(got) == np.signbit(want))) | (np.isnan(got) & np.isnan(want))
        decided[rows[each_once]] = True
        same[rows[each_once]] = equal.all(axis=1)
    return decided, same


def _metric_entries(column: pa.ChunkedArray, names: list[str]) -> tuple[np.ndarray, ...] | None:
    """For the metrics column: per row the index of its first entry and its entry count, per entry
    the index of its name in ``names`` (−1 for another) and its value; None unless it is a
    ``map<string, float64>`` holding no null row, name or value."""
    if not pa.types.is_map(column.type) or not pa.types.is_float64(column.type.item_type) or column.null_count:
        return None
    parts: list[tuple[np.ndarray, ...]] = [(np.zeros(0, np.int64),) * 3 + (np.zeros(0),)]
    base = 0
    for chunk in column.chunks:
        keys, items, offsets = chunk.keys, chunk.items, chunk.offsets
        if not len(chunk):
            continue
        if keys.null_count or items.null_count:
            return None
        bounds = np.frombuffer(offsets.buffers()[1], np.int32, len(chunk) + 1, 4 * offsets.offset).astype(np.int64)
        lo, hi = int(bounds[0]), int(bounds[-1])
        value = np.frombuffer(items.buffers()[1], np.float64, len(items), 8 * items.offset)
        parts.append((bounds[:-1] - lo + base, np.diff(bounds), string_codes(keys, names)[lo:hi], value[lo:hi]))
        base += hi - lo
    starts, counts, codes, values = (np.concatenate(column) for column in zip(*parts, strict=True))
    return starts, counts, codes, values


def _same_metrics(column: list[tuple[str, float]], body: Any) -> bool:
    """The Parquet metrics map equals the body's metrics exactly (NaN equals NaN, signed zeros
    differ)."""
    if not isinstance(body, dict) or len(column) != len(body) or len({name for name, _ in column}) != len(column):
        return False  # a repeated key would let one signed value stand in for the others
    for name, value in column:
        other = body.get(name)
        if isinstance(other, bool) or not isinstance(other, (int, float)) or not floats_equal(value, float(other)):
            return False
    return True


def check_signatures(ctx: Context) -> CheckResult:
    """Verify the Ed25519 signature of every entry (or the head and a sample) with the given
    key, or with the genesis key when none is given (then at best a warning)."""
    loaded, key, sample, rng = ctx.loaded, ctx.key, ctx.options.sample, ctx.rng
    workers, progress = ctx.options.workers, ctx.progress
    n = len(loaded.records)
    if n == 0:
        return CheckResult("signatures", Status.FAIL, "the ledger holds no entries")
    embedded = loaded.genesis.get("public_key") if loaded.genesis else None
    if key is None:
        if not isinstance(embedded, bytes) or len(embedded) != 32:
            return CheckResult("signatures", Status.FAIL, "no --key given and the genesis carries no usable public key")
        used = PublicKey(embedded)
        if loaded.genesis and loaded.genesis.get("key_id") != used.key_id:
            return CheckResult("signatures", Status.FAIL, "genesis key_id is not the SHA-256 of its public key")
    else:
        used = key
    index = list(range(n)) if sample is None else sorted({0, n - 1, *rng.sample(range(n), min(sample, n))})
    column = loaded.table["signature"]
    records = loaded.records.materialize() if sample is None else [loaded.records[i] for i in index]
    sigs = column.to_pylist() if sample is None else pylist_at(column, index)
    bad = [index[i] for i in bad_signatures(used.raw, records, sigs, workers=workers,
                                            progress=(lambda d, t: progress("signatures", d, t)) if progress else None)]
    data: dict[str, Any] = {"key_id": used.key_id.hex(), "checked": len(index), "entries": n,
                            "key_source": "given" if key is not None else "embedded"}
    signer = loaded.genesis.get("key_id") if loaded.genesis else None
    if bad:
        data.update({"bad_signatures": len(bad), "first_bad_seq": bad[0]})
        why = ""
        if key is not None and isinstance(signer, bytes) and signer != key.key_id:
            why = f" (the ledger names signer key id {signer.hex()[:16]}…, the given key is {key.key_id.hex()[:16]}…)"
        return CheckResult("signatures", Status.FAIL, f"{len(bad)} of {len(index)} signatures do not verify; "
                           f"first bad entry seq {bad[0]}{why}", data)
    scope = f"all {n}" if sample is None else f"head, genesis and a random sample: {len(index)} of {n}"
    if sample is not None:
        return CheckResult("signatures", Status.WARN, f"only a sample was checked ({scope} signatures valid); "
                           "run without --sample to check every entry", data,
                           summary=f"only {len(index)} of {n} signatures checked (--sample)")
    if key is None:
        return CheckResult("signatures", Status.WARN, f"self-consistent, signer not authenticated: {scope} "
                           f"signatures verify with the key embedded in genesis (key id {used.key_id.hex()[:16]}…); "
                           "pass --key with the trainer's published public key", data,
                           summary="self-consistent, signer not authenticated: no --key given")
    return CheckResult("signatures", Status.PASS, f"{scope} signatures verify with key id {used.key_id.hex()[:16]}…",
                       data)


def check_seal(ctx: Context) -> CheckResult:
    """The seal is the last entry and its entry count, head and tree root match the entries."""
    loaded, ledger = ctx.loaded, ctx.ledger
    n = len(loaded.records)
    if n == 0:
        return CheckResult("seal", Status.FAIL, "the ledger holds no entries")
    last = loaded.records[-1]
    try:
        header = _record.decode_header(last)
    except FormatError as exc:
        return CheckResult("seal", Status.FAIL, f"seq {n - 1}: head entry unreadable: {exc}", {"first_bad_seq": n - 1})
    if header.kind is not Kind.SEAL:
        return CheckResult("seal", Status.WARN, "not sealed: the ledger ends at seq "
                           f"{n - 1} without a seal (a run still open or interrupted, or entries dropped "
                           f"from the end){_manifest_hint(ledger, n)}", {"sealed": False},
                           summary="not sealed: the ledger may be cut short")
    try:
        body = SealBody.from_body(decode_body(last[HEADER_SIZE:]))
    except FormatError as exc:
        return CheckResult("seal", Status.FAIL, f"seq {n - 1}: seal body unreadable: {exc}",
                           {"sealed": True, "first_bad_seq": n - 1})
    problems = []
    if body.entry_count != n - 1:
        problems.append(f"entry_count {body.entry_count} but {n - 1} entries precede the seal")
    if body.head != (loaded.hashes[-2] if n > 1 else _record.ZERO_HASH):
        problems.append("head does not equal the hash of the entry before the seal")
    if body.tree_root != ctx.tree().root(n - 1):
        problems.append("tree_root does not equal the Merkle tree hash of the entries before the seal")
    data = {"sealed": True, "entry_count": body.entry_count, "tree_root": body.tree_root.hex()}
    if problems:
        return CheckResult("seal", Status.FAIL, f"seal at seq {n - 1}: {'; '.join(problems)}",
                           {**data, "first_bad_seq": n - 1})
    return CheckResult("seal", Status.PASS, f"sealed after {n - 1} entries; count, head and Merkle root match", data)


def _manifest_hint(ledger: Ledger, n: int) -> str:
    """A note when the (untrusted) manifest claims more entries or a seal; nothing when it cannot
    be read (a FIFO, a device, a huge or malformed file)."""
    try:
        manifest = json.loads(read_regular(ledger.layout.manifest, what="manifest", limit=_MANIFEST_LIMIT))
    except (OSError, ValueError, RecursionError, LedgerError):
        return ""
    if not isinstance(manifest, dict):
        return ""
    claimed = manifest.get("entries")
    if isinstance(claimed, int) and (claimed > n or manifest.get("sealed")):
        return (f"; note: manifest.json (not trusted) lists {claimed} entries"
                f"{' and a seal' if manifest.get('sealed') else ''}, so entries may have been removed")
    return ""
