"""Integrity checks that need only the ledger: ``chain``, ``signatures`` and ``seal``.

The chain check works on the header bytes of every record with numpy (no body decoding), then
decodes the bodies it must (genesis, seal, and every body or a sample) to check the typed
columns against them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ledger import _record
from ledger._crypto import PublicKey
from ledger._encoding import decode_body, floats_equal
from ledger._reader import Ledger
from ledger._record import HEADER_SIZE, Kind, merkle_root
from ledger.errors import FormatError
from ledger.verify._result import CheckResult
from ledger.verify._signatures import bad_signatures

Progress = Callable[[str, int, int], None]
_KIND_LABELS = pa.array([k.label for k in sorted(Kind)])  # index == kind code


class Records:
    """The record bytes of every entry, read from Arrow buffers on demand; ``materialize`` turns
    them into a list once (full verification), sampled checks take only what they need."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self._chunks = [c for c in column.chunks if len(c)]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
        self._list: list[bytes] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> bytes:
        if self._list is not None:
            return self._list[index]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        value: bytes = self._chunks[chunk][index - int(self._starts[chunk])].as_py()
        return value

    def materialize(self) -> list[bytes]:
        """All records as a list of bytes (kept)."""
        if self._list is None:
            self._list = [r for c in self._chunks for r in c.to_pylist()]
        return self._list


@dataclass(slots=True)
class Loaded:
    """The ledger's rows, with recomputed hashes (shared by the checks)."""

    table: pa.Table
    records: Records
    hashes: list[bytes]
    errors: list[tuple[str, str]]  # (source, reason) for unreadable parts
    genesis: dict[str, Any] | None
    genesis_error: str | None


def _binary_chunks(column: pa.ChunkedArray) -> Iterator[tuple[np.ndarray, memoryview]]:
    """(int64 offsets, data bytes) of each non-empty chunk of a binary column, straight from the
    Arrow buffers (nothing copied)."""
    for chunk in column.chunks:
        n = len(chunk)
        if not n:
            continue
        width = 8 if pa.types.is_large_binary(chunk.type) else 4
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if width == 8 else np.int32, count=n + 1,
                                offset=chunk.offset * width).astype(np.int64)
        yield offsets, memoryview(chunk.buffers()[2] or b"")


def _leaf_hashes(column: pa.ChunkedArray) -> list[bytes]:
    """RFC 9162 leaf hashes of every record, straight from the Arrow buffers (no bytes objects
    are kept per record)."""
    sha, out = hashlib.sha256, []
    for offsets, data in _binary_chunks(column):
        bounds = offsets.tolist()
        out.extend([sha(b"\x00" + data[bounds[i]:bounds[i + 1]]).digest() for i in range(len(bounds) - 1)])
    return out


def load(ledger: Ledger) -> Loaded:
    """Read every readable source and recompute every entry hash (hashing one part while the
    reader decompresses the next)."""
    tables, errors, hashes = [], [], []
    for source in ledger.iter_sources():
        if source.table is None:
            errors.append((source.name, source.error or "unreadable"))
            continue
        tables.append(source.table)
        hashes.extend(_leaf_hashes(source.table["record"]))
    if tables:
        table = pa.concat_tables(tables)
    else:
        from ledger._parts import SCHEMA

        table = SCHEMA.empty_table()
    records = Records(table["record"])
    genesis, genesis_error = None, None
    if len(records):
        try:
            header = _record.decode_header(records[0])
            if header.kind is not Kind.GENESIS:
                raise FormatError("first entry is not a genesis")
            genesis = decode_body(records[0][HEADER_SIZE:])
        except FormatError as exc:
            genesis_error = str(exc)
    else:
        genesis_error = "the ledger holds no entries"
    return Loaded(table, records, hashes, errors, genesis, genesis_error)


def _header_matrix(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 92) uint8 header bytes of every record (zeros where a record is too short), and the
    record lengths; read straight from Arrow's buffers, chunk by chunk, without copying records."""
    rows, lengths = [np.zeros((0, HEADER_SIZE), np.uint8)], [np.zeros(0, np.int64)]
    window = np.arange(HEADER_SIZE)
    for offsets, raw in _binary_chunks(column):
        data = np.frombuffer(raw, dtype=np.uint8)
        size = np.diff(offsets)
        ok = size >= HEADER_SIZE
        block = np.zeros((len(size), HEADER_SIZE), np.uint8)
        block[ok] = data[offsets[:-1][ok, None] + window]
        rows.append(block)
        lengths.append(size)
    return np.concatenate(rows), np.concatenate(lengths)


def _fixed_rows(column: pa.ChunkedArray) -> np.ndarray:
    """(n, width) uint8 view of a fixed_size_binary column."""
    width = column.type.byte_width
    parts = [np.zeros((0, width), np.uint8)]
    for chunk in column.chunks:
        if len(chunk):
            data = np.frombuffer(chunk.buffers()[1], dtype=np.uint8)
            parts.append(data[chunk.offset * width:(chunk.offset + len(chunk)) * width].reshape(-1, width))
    return np.concatenate(parts)


def _field(headers: np.ndarray, lo: int, hi: int, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(headers[:, lo:hi]).view(dtype).ravel()


def check_chain(loaded: Loaded, *, sample: int | None, rng: random.Random,
                progress: Progress | None = None) -> CheckResult:
    """Recompute every hash, check links, seq contiguity, run id, kinds and that the typed
    columns equal the record bytes; name the first bad entry by seq."""
    t, n = loaded.table, len(loaded.records)
    problems: dict[int, list[str]] = {}

    def flag(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask)[:1000]:
            problems.setdefault(int(i), []).append(reason)

    if n == 0:
        reasons = [f"{name}: {reason}" for name, reason in loaded.errors] or ["the ledger holds no entries"]
        return CheckResult("chain", "fail", "; ".join(reasons), {"entries": 0, "first_bad_seq": 0})
    headers, lengths = _header_matrix(t["record"])
    flag(lengths < HEADER_SIZE, f"record shorter than the {HEADER_SIZE}-byte header")
    version = _field(headers, 0, 2, ">u2")
    kind = headers[:, 2].astype(np.int64)
    seq = _field(headers, 4, 12, ">u8").astype(np.int64)
    step = _field(headers, 12, 20, ">i8")
    time_ns = _field(headers, 20, 28, ">i8")
    run_dg, prev = headers[:, 28:60], headers[:, 60:92]
    hashes = np.frombuffer(b"".join(loaded.hashes), dtype=np.uint8).reshape(n, 32)
    position = np.arange(n)
    flag(version != _record.FORMAT_VERSION, f"unknown format version (expected {_record.FORMAT_VERSION})")
    flag(headers[:, 3] != 0, "reserved header byte is not zero")
    flag(kind > max(Kind), "unknown entry kind")
    flag(seq != position, "seq is not contiguous here (an entry is missing, duplicated or moved)")
    expected_prev = np.vstack([np.zeros((1, 32), np.uint8), hashes[:-1]])
    flag((prev != expected_prev).any(axis=1), "prev_hash does not equal the previous entry's hash")
    flag((kind == Kind.GENESIS) & (position != 0), "a genesis entry after the first position")
    flag((kind == Kind.SEAL) & (position != n - 1), "entries follow the seal")
    if kind[0] != Kind.GENESIS:
        problems.setdefault(0, []).append("the first entry is not a genesis")
    # run id and signer: every entry names the genesis run and key
    if loaded.genesis is not None:
        run_id = str(loaded.genesis.get("run_id", ""))
        flag((run_dg != np.frombuffer(_record.run_digest(run_id), np.uint8)).any(axis=1),
             "run-id digest differs from the genesis run (an entry from another run)")
        flag(pc.not_equal(t["run_id"], run_id).to_numpy(zero_copy_only=False), "run_id column differs from genesis")
        gkid = loaded.genesis.get("key_id", b"")
        gkid_row = np.frombuffer(gkid if isinstance(gkid, bytes) and len(gkid) == 32 else bytes(32), np.uint8)
        flag((_fixed_rows(t["key_id"]) != gkid_row).any(axis=1), "key_id column differs from the genesis key id")
    elif loaded.genesis_error:
        problems.setdefault(0, []).append(f"genesis unreadable: {loaded.genesis_error}")
    # typed columns against the header bytes
    flag(t["seq"].to_numpy() != seq, "seq column differs from the record header")
    flag(t["step"].to_numpy() != step, "step column differs from the record header")
    flag(t["time_ns"].to_numpy() != time_ns, "time_ns column differs from the record header")
    kinds_col = pc.fill_null(pc.index_in(t["kind"], value_set=_KIND_LABELS), -1).to_numpy()
    flag(kinds_col != kind, "kind column differs from the record header")
    flag((_fixed_rows(t["hash"]) != hashes).any(axis=1), "hash column differs from the hash of the record bytes")
    if progress:
        progress("chain", n, n)
    # bodies: genesis, seal and all others (or a sample) decoded and compared with the metrics column
    decode = list(range(n)) if sample is None else sorted({0, n - 1, *rng.sample(range(n), min(sample, n))})
    records: Records | list[bytes] = loaded.records.materialize() if sample is None else loaded.records
    column_metrics = t["metrics"].to_pylist() if sample is None else t["metrics"].take(decode).to_pylist()
    for i, column in zip(decode, column_metrics, strict=True):
        if lengths[i] < HEADER_SIZE:
            continue
        try:
            body = decode_body(records[i][HEADER_SIZE:])
            if not _same_metrics(column, body.get("metrics", {})):
                problems.setdefault(i, []).append("metrics column differs from the record body")
        except (FormatError, TypeError, ValueError, AttributeError) as exc:
            problems.setdefault(i, []).append(f"body: {exc}")
    data: dict[str, Any] = {"entries": n, "bodies_decoded": len(decode)}
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
        return CheckResult("chain", "fail", where, data)
    sampled = "" if sample is None else f"; bodies decoded for {len(decode)} of them (--sample)"
    return CheckResult("chain", "pass", f"{n} entries linked from genesis to head {loaded.hashes[-1].hex()[:16]}…"
                       f", every hash recomputed{sampled}", data)


def _same_metrics(column: list[tuple[str, float]], body: Any) -> bool:
    """The Parquet metrics map equals the body's metrics exactly (NaN equals NaN, signed zeros
    differ)."""
    if not isinstance(body, dict) or len(column) != len(body):
        return False
    for name, value in column:
        other = body.get(name)
        if isinstance(other, bool) or not isinstance(other, (int, float)) or not floats_equal(value, float(other)):
            return False
    return True


def check_signatures(loaded: Loaded, key: PublicKey | None, *, sample: int | None, rng: random.Random,
                     workers: int | None = None, progress: Progress | None = None) -> CheckResult:
    """Verify the Ed25519 signature of every entry (or the head and a sample) with the given
    key, or with the genesis key when none is given (then at best a warning)."""
    n = len(loaded.records)
    if n == 0:
        return CheckResult("signatures", "fail", "the ledger holds no entries")
    embedded = loaded.genesis.get("public_key") if loaded.genesis else None
    if key is None:
        if not isinstance(embedded, bytes) or len(embedded) != 32:
            return CheckResult("signatures", "fail", "no --key given and the genesis carries no usable public key")
        used = PublicKey(embedded)
        if loaded.genesis and loaded.genesis.get("key_id") != used.key_id:
            return CheckResult("signatures", "fail", "genesis key_id is not the SHA-256 of its public key")
    else:
        used = key
    index = list(range(n)) if sample is None else sorted({0, n - 1, *rng.sample(range(n), min(sample, n))})
    column = loaded.table["signature"]
    records = loaded.records.materialize() if sample is None else [loaded.records[i] for i in index]
    sigs = column.to_pylist() if sample is None else column.take(index).to_pylist()
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
        return CheckResult("signatures", "fail", f"{len(bad)} of {len(index)} signatures do not verify; "
                           f"first bad entry seq {bad[0]}{why}", data)
    scope = f"all {n}" if sample is None else f"head, genesis and a random sample: {len(index)} of {n}"
    if sample is not None:
        return CheckResult("signatures", "warn", f"only a sample was checked ({scope} signatures valid); "
                           "run without --sample to check every entry", data,
                           summary=f"only {len(index)} of {n} signatures checked (--sample)")
    if key is None:
        return CheckResult("signatures", "warn", f"self-consistent, signer not authenticated: {scope} "
                           f"signatures verify with the key embedded in genesis (key id {used.key_id.hex()[:16]}…); "
                           "pass --key with the trainer's published public key", data,
                           summary="self-consistent, signer not authenticated: no --key given")
    return CheckResult("signatures", "pass", f"{scope} signatures verify with key id {used.key_id.hex()[:16]}…", data)


def check_seal(loaded: Loaded, ledger: Ledger) -> CheckResult:
    """The seal is the last entry and its entry count, head and tree root match the entries."""
    n = len(loaded.records)
    if n == 0:
        return CheckResult("seal", "fail", "the ledger holds no entries")
    last = loaded.records[-1]
    try:
        header = _record.decode_header(last)
    except FormatError as exc:
        return CheckResult("seal", "fail", f"head entry unreadable: {exc}")
    if header.kind is not Kind.SEAL:
        return CheckResult("seal", "warn", "not sealed: the ledger ends at seq "
                           f"{n - 1} without a seal (a run still open or interrupted, or entries dropped "
                           f"from the end){_manifest_hint(ledger, n)}", {"sealed": False},
                           summary="not sealed: the ledger may be cut short")
    try:
        body = decode_body(last[HEADER_SIZE:])
    except FormatError as exc:
        return CheckResult("seal", "fail", f"seal body unreadable: {exc}", {"sealed": True})
    problems = []
    if body.get("entry_count") != n - 1:
        problems.append(f"entry_count {body.get('entry_count')} but {n - 1} entries precede the seal")
    if body.get("head") != (loaded.hashes[-2] if n > 1 else _record.ZERO_HASH):
        problems.append("head does not equal the hash of the entry before the seal")
    if body.get("tree_root") != merkle_root(loaded.hashes[:-1]):
        problems.append("tree_root does not equal the Merkle tree hash of the entries before the seal")
    data = {"sealed": True, "entry_count": body.get("entry_count"),
            "tree_root": body["tree_root"].hex() if isinstance(body.get("tree_root"), bytes) else None}
    if problems:
        return CheckResult("seal", "fail", "; ".join(problems), data)
    return CheckResult("seal", "pass", f"sealed after {n - 1} entries; count, head and Merkle root match", data)


def _manifest_hint(ledger: Ledger, n: int) -> str:
    try:
        manifest = json.loads(ledger.layout.manifest.read_text())
    except (OSError, ValueError):
        return ""
    claimed = manifest.get("entries")
    if isinstance(claimed, int) and (claimed > n or manifest.get("sealed")):
        return (f"; note: manifest.json (not trusted) lists {claimed} entries"
                f"{' and a seal' if manifest.get('sealed') else ''}, so entries may have been removed")
    return ""
