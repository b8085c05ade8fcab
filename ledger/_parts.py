"""Immutable Parquet parts: the only module that touches pyarrow writers.

Schema (docs/FORMAT.md §6): one row per entry, ``record`` holding the exact signed bytes and the
other columns a decoded view of them that verify checks against the bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ledger._entry import Entry
from ledger._layout import FdSink, create_file, unlink_quietly
from ledger._record import FORMAT_VERSION, HASH_SIZE, SIGNATURE_SIZE
from ledger.errors import FormatError

SCHEMA = pa.schema([
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("time_ns", pa.int64(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("key_id", pa.binary(HASH_SIZE), nullable=False),
    pa.field("hash", pa.binary(HASH_SIZE), nullable=False),
    pa.field("metrics", pa.map_(pa.string(), pa.float64()), nullable=False),
    pa.field("record", pa.binary(), nullable=False),
    pa.field("signature", pa.binary(SIGNATURE_SIZE), nullable=False),
])
PART_DIGITS = 6
# Readers read at most this many parts (33 million entries at the default roll-over, more than verify
# holds in memory); a writer refuses to roll past it (docs/FORMAT.md §6.3).
MAX_PARTS = 4096
# A part a writer leaves decodes to at most this many times its size (readers allow 32 ×, §6.4).
MAX_RATIO = 16


def part_name(index: int) -> str:
    """File name of the ``index``-th part (``000000.parquet``)."""
    return f"{index:0{PART_DIGITS}d}.parquet"


def list_parts(parts_dir: Path) -> list[Path]:
    """Part files in order; stray names are ignored (temporary files of an interrupted roll)."""
    if not parts_dir.is_dir():
        return []
    found = []
    for path in parts_dir.iterdir():
        stem = path.name.removesuffix(".parquet")
        if path.name.endswith(".parquet") and len(stem) == PART_DIGITS and stem.isascii() and stem.isdigit():
            found.append(path)
    return sorted(found)


def entries_table(entries: Sequence[Entry], run_id: str, metrics: Sequence[dict[str, float]],
                  hashes: Sequence[bytes] | None = None) -> pa.Table:
    """The Arrow table of a run of entries (``metrics[i]`` is entry i's metrics map; ``hashes``
    are the entry hashes when the caller already has them)."""
    headers = [entry.header for entry in entries]
    columns: dict[str, Any] = {
        "seq": [h.seq for h in headers],
        "kind": [h.kind.label for h in headers],
        "step": [h.step for h in headers],
        "time_ns": [h.time_ns for h in headers],
        "run_id": [run_id] * len(entries),
        "key_id": [e.key_id for e in entries],
        "hash": list(hashes) if hashes is not None else [e.hash for e in entries],
        "metrics": [list(m.items()) for m in metrics],
        "record": [e.record for e in entries],
        "signature": [e.signature for e in entries],
    }
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) for f in SCHEMA], schema=SCHEMA)


def write_part(path: Path, table: pa.Table, run_id: str) -> dict[str, Any]:
    """Write a part durably: temporary file, fsync, rename, fsync of the directory. Returns its
    manifest metadata (rows, seq range, SHA-256 of the file).

    Refuses to replace an existing part (parts are never rewritten). On an error before the rename
    nothing is left behind; pyarrow gets an open file object, so any path the OS takes works."""
    if path.exists():
        raise FormatError(f"part {path.name} already exists; parts are never rewritten")
    first, last = table["seq"][0].as_py(), table["seq"][-1].as_py()
    meta = {b"training_ledger.format": str(FORMAT_VERSION).encode(), b"training_ledger.run_id": run_id.encode(),
            b"training_ledger.seq": f"{first}-{last}".encode()}
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(path.name + ".tmp")
    unlink_quietly(tmp)  # a stale temporary file of an interrupted roll
    sink = _write_file(tmp, table, "zstd")
    if table.nbytes > MAX_RATIO * os.stat(tmp).st_size:
        # entries so repetitive that zstd shrinks them more than readers let a part decode to
        # (docs/FORMAT.md §6.4): written uncompressed, so the part reads whatever else the ledger holds
        unlink_quietly(tmp)
        sink = _write_file(tmp, table, "none")
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_path(path.parent)
    return {"entries": table.num_rows, "seq": f"{first}-{last}", "sha256": sink.sha256.hexdigest()}


def _write_file(tmp: Path, table: pa.Table, compression: str) -> FdSink:
    """Write ``table`` as Parquet to the new file ``tmp`` and fsync it; nothing left on error."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        sink = FdSink(fd)
        try:
            pq.write_table(table, sink, compression=compression, row_group_size=65536,
                           use_dictionary=["kind", "run_id", "key_id"], write_statistics=["seq", "step", "time_ns"])
        except OSError:
            raise
        except pa.ArrowException as exc:  # pyarrow re-raises the sink's OSError as its own
            raise OSError(getattr(exc, "errno", None) or errno.EIO, f"writing the part failed ({exc})") from exc
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    os.close(fd)
    return sink


def read_part(path: Path, budget: Any = None, index: int = 0) -> pa.Table:
    """Read a part; a damaged, foreign or oversized file raises :class:`FormatError` naming it.

    Only a regular file of at most 1 GiB is opened; its footer and every page header are checked
    against what the format allows (:mod:`ledger._partcheck`) before Arrow decodes a value, so a
    crafted part costs at most a bounded multiple of its size in memory and time. ``budget`` (a
    :class:`~ledger._partcheck.LedgerBudget`) is what the parts of the whole ledger may decode to;
    this part, the ``index``-th, takes its share of it in its turn."""
    from ledger._io import open_regular
    from ledger._partcheck import MAX_PART_BYTES, expand_dictionaries

    planned = False
    try:
        with open_regular(path, what="part", limit=MAX_PART_BYTES) as handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                with budget.turn(index) if budget is not None else nullcontext():
                    planned = True
                    plan = _part_plan(handle, path.name, size, budget.left if budget is not None else None)
                    if budget is not None:
                        budget.take(plan.cost)
                # one thread per file: measured faster than Arrow's pool on 2 cores, and the reader
                # already overlaps reading the next part with hashing this one
                handle.seek(0)
                parquet = pq.ParquetFile(handle, read_dictionary=plan.dictionary_columns or None)
                table = parquet.read(use_threads=False)
            except (pa.ArrowException, OSError, ValueError, TypeError, IndexError, OverflowError) as exc:
                raise FormatError(f"part {path.name} is unreadable ({exc})") from exc
    finally:
        if budget is not None and not planned:  # refused before its turn: pass the turn on, in order
            with budget.turn(index):
                pass
    table = expand_dictionaries(table, plan.dictionary_columns, plan.budget, path.name)
    if not table.schema.remove_metadata().equals(SCHEMA):
        raise FormatError(f"part {path.name} does not have the ledger schema")
    return table


def _part_plan(handle: Any, name: str, size: int, allowance: int | None) -> Any:
    from ledger._partcheck import check_part

    parquet = pq.ParquetFile(handle)
    if not parquet.schema_arrow.remove_metadata().equals(SCHEMA):
        raise FormatError(f"part {name} does not have the ledger schema")
    return check_part(handle, parquet.metadata, size, name, allowance)


def table_entries(table: pa.Table) -> list[Entry]:
    """Entries of a part table (record, signature and key id columns)."""
    return [Entry(record=r, signature=s, key_id=k) for r, s, k in zip(
        table["record"].to_pylist(), table["signature"].to_pylist(), table["key_id"].to_pylist(), strict=True)]


def part_metadata(path: Path) -> dict[str, Any]:
    """Rows, seq range and SHA-256 of a part file (for the manifest)."""
    from ledger._io import open_regular
    from ledger._partcheck import MAX_PART_BYTES

    digest = hashlib.sha256()
    with open_regular(path, what="part", limit=MAX_PART_BYTES) as handle:
        try:
            meta = pq.ParquetFile(handle).metadata
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise FormatError(f"part {path.name} is unreadable ({exc})") from exc
        handle.seek(0)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    raw = (meta.metadata or {}).get(b"training_ledger.seq", b"")
    seq_range = raw.decode("utf-8", "replace")
    return {"entries": meta.num_rows, "seq": seq_range, "sha256": digest.hexdigest()}


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace a small JSON file atomically (the manifest); on failure the old one stays."""
    tmp = path.with_name(path.name + ".tmp")
    unlink_quietly(tmp)
    create_file(tmp, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
