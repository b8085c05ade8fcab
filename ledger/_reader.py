"""Reading a ledger: parts plus the log tail, strictly read-only."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from ledger import _parts, _wal
from ledger._arrow import typed_array
from ledger._encoding import decode_body
from ledger._entry import Entry
from ledger._layout import Layout
from ledger._record import HASH_SIZE, HEADER_OFFSETS, HEADER_SIZE, SIGNATURE_SIZE, Kind, decode_header
from ledger.errors import FormatError

if TYPE_CHECKING:
    from ledger._partcheck import LedgerBudget

_VERSION_SIZE = HEADER_OFFSETS["version"][0] + HEADER_OFFSETS["version"][1]  # the version is the first field


@dataclass(frozen=True, slots=True)
class Source:
    """One stretch of the ledger as found on disk: a part file or the log tail.

    ``table`` is None when the source could not be read; ``error`` says why."""

    name: str
    table: pa.Table | None
    error: str | None = None


class Ledger:
    """A ledger directory opened for reading. Never writes, never takes the writer's lock."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.layout = Layout(Path(path)).require()
        self.path = self.layout.root
        self._sources: list[Source] | None = None
        self.wal_torn = b""
        self.wal_versions: frozenset[int] = frozenset()  # the format versions the log's records say

    # ----------------------------------------------------------------- raw access
    def sources(self) -> list[Source]:
        """Every part (in order) and the log tail, each read or with its read error."""
        if self._sources is None:
            self._sources = list(self.iter_sources())
        return self._sources

    def iter_sources(self) -> Iterator[Source]:
        """Like :meth:`sources`, yielding each part as soon as it is read while the next one is
        read in a background thread (so a caller can hash one part while the next decompresses)."""
        if self._sources is not None:
            yield from self._sources
            return
        # A writer may roll the log into a new part while we read: list, read the log, list again.
        for _ in range(5):
            before = _parts.list_parts(self.layout.parts)
            try:
                frames, wal_error = _wal.read_frames(self.layout.wal), None
            except FormatError as exc:
                frames, wal_error = _wal.WalFrames(memoryview(b""), [], 0, b""), str(exc)
            if _parts.list_parts(self.layout.parts) == before:
                break
        sources: list[Source] = []
        if len(before) > _parts.MAX_PARTS:  # more than a writer leaves: refused before any is opened
            refused = Source("parts", None, f"the ledger holds {len(before)} parts, more than the {_parts.MAX_PARTS} a "
                                            "reader reads (a writer never rolls past them)")
            self._sources = [refused]
            yield refused
            return
        last_seq, run_id = -1, None
        # what all the parts together may decode to (docs/FORMAT.md §6.4), taken part by part in order
        from ledger._partcheck import LedgerBudget

        budget = LedgerBudget(sum(_disk_size(p) for p in before))
        with ThreadPoolExecutor(2, thread_name_prefix="ledger-read") as pool:
            for future in [pool.submit(_read_source, p, budget, i) for i, p in enumerate(before)]:
                source = future.result()
                if source.table is not None and source.table.num_rows:
                    last_seq = max(last_seq, source.table["seq"][-1].as_py())
                    run_id = run_id or source.table["run_id"][0].as_py()
                sources.append(source)
                yield source
        if wal_error is not None:
            tail_source: Source | None = Source("wal.log", None, wal_error)
        else:
            # Frames already rolled into a part (a roll interrupted before the log was reset).
            records = [frames.record(i) for i in range(len(frames.payloads))]
            self.wal_versions = frozenset(int.from_bytes(r[:_VERSION_SIZE], "big") for r in records
                                          if len(r) >= _VERSION_SIZE)
            tail = [i for i, r in enumerate(records) if _safe_seq(r) > last_seq]
            del records
            self.wal_torn = frames.torn
            tail_source = None
            if tail:
                try:
                    tail_source = Source("wal.log", wal_table(frames, tail, run_id))
                except FormatError as exc:
                    tail_source = Source("wal.log", None, str(exc))
            del frames  # the log's bytes: the table holds copies of what it needs
        if tail_source is not None:
            sources.append(tail_source)
            yield tail_source
        self._sources = sources

    def table(self) -> pa.Table:
        """All readable rows as one Arrow table (raises on an unreadable part)."""
        tables = []
        for source in self.sources():
            if source.table is None:
                raise FormatError(f"{source.name}: {source.error}")
            tables.append(source.table)
        if not tables:
            return _parts.SCHEMA.empty_table()
        return pa.concat_tables(tables)

    def entries(self) -> Iterator[Entry]:
        """Every entry in order (raises on an unreadable part)."""
        for source in self.sources():
            if source.table is None:
                raise FormatError(f"{source.name}: {source.error}")
            yield from _parts.table_entries(source.table)

    def genesis_entry(self) -> Entry:
        """The first entry; it must be a genesis."""
        first = next(self.entries(), None)
        if first is None or first.kind is not Kind.GENESIS:
            raise FormatError(f"{self.path} has no genesis entry")
        return first

    def last_entry(self) -> Entry:
        """The head entry."""
        for source in reversed(self.sources()):
            if source.table is None:
                raise FormatError(f"{source.name}: {source.error}")
            if source.table.num_rows:
                return _parts.table_entries(source.table.slice(source.table.num_rows - 1))[0]
        raise FormatError(f"{self.path} holds no entries")

    def wal_tail(self) -> list[Entry]:
        """Entries still in the log (not yet in a part)."""
        tail = [s for s in self.sources() if s.name == "wal.log" and s.table is not None]
        return _parts.table_entries(tail[0].table) if tail else []

    def __len__(self) -> int:
        return sum(s.table.num_rows for s in self.sources() if s.table is not None)

    # ----------------------------------------------------------------- views
    def genesis(self) -> dict[str, Any]:
        """The genesis body."""
        return self.genesis_entry().body()

    @property
    def run_id(self) -> str:
        """The run id from genesis."""
        return str(self.genesis()["run_id"])

    @property
    def sealed(self) -> bool:
        """True when the last entry is a seal."""
        return self.last_entry().kind is Kind.SEAL

    def to_pandas(self, max_metrics: int | None = 256) -> Any:
        """One row per entry: seq, kind, step, time (UTC), hash (hex), then one column per metric
        (NaN where an entry did not log it; a name logged twice in one entry keeps its last value).

        At most ``max_metrics`` metric columns (None: no cap): when the entries log more distinct
        names, the most often logged are kept (in order of first appearance) and the number left out
        is in ``frame.attrs["metrics_omitted"]``. The columns are built from the flattened
        (entry, name, value) triples, so memory grows with the entries and the kept columns, never
        with entries × distinct names."""
        import numpy as np
        import pandas as pd
        import pyarrow.compute as pc

        table = self.table()
        frame = pd.DataFrame({
            "seq": table["seq"].to_numpy(),
            "kind": table["kind"].to_pylist(),
            "step": table["step"].to_numpy(),
            "time": pd.to_datetime(table["time_ns"].to_numpy(), unit="ns", utc=True),
            "hash": [h.hex() for h in table["hash"].to_pylist()],
        })
        # the (row, name, value) triples of every map (a map viewed as the list of its entries)
        rows_parts, keys_parts, values_parts, base = [], [], [], 0
        for chunk in table["metrics"].chunks:
            entries = chunk.cast(pa.list_(pa.struct([chunk.type.key_field, chunk.type.item_field])))
            flat = entries.flatten()
            rows_parts.append(base + entries.value_parent_indices().to_numpy(zero_copy_only=False))
            keys_parts.append(flat.field(0))
            values_parts.append(flat.field(1).to_numpy(zero_copy_only=False))
            base += len(chunk)
        if not keys_parts or not sum(len(k) for k in keys_parts):
            return frame
        encoded = pc.dictionary_encode(pa.concat_arrays(keys_parts))
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        names = encoded.dictionary.to_pylist()  # in order of first appearance
        rows = np.concatenate(rows_parts)
        values = np.concatenate(values_parts).astype(np.float64)  # a null value is NaN
        eligible = np.array([name not in frame.columns for name in names], dtype=bool)
        counts = np.bincount(codes, minlength=len(names))
        kept = np.flatnonzero(eligible)
        omitted = 0
        if max_metrics is not None and len(kept) > max_metrics:
            by_use = kept[np.argsort(-counts[kept], kind="stable")][:max(max_metrics, 0)]
            omitted, kept = len(kept) - len(by_use), np.sort(by_use)
        column = np.full(len(names), -1, dtype=np.int64)
        column[kept] = np.arange(len(kept))
        cols = column[codes]
        mine = cols >= 0
        rows, cols, values = rows[mine], cols[mine], values[mine]
        # a name twice in one entry: the last value wins (as in a dict)
        cell = rows * max(len(kept), 1) + cols
        _, last = np.unique(cell[::-1], return_index=True)
        pick = len(cell) - 1 - last
        dense = np.full((len(frame), len(kept)), np.nan)
        dense[rows[pick], cols[pick]] = values[pick]
        metrics = pd.DataFrame(dense, columns=[names[i] for i in kept], index=frame.index)
        out = pd.concat([frame, metrics], axis=1)
        if omitted:
            out.attrs["metrics_omitted"] = omitted
        return out


def _read_source(path: Path, budget: LedgerBudget | None = None, index: int = 0) -> Source:
    try:
        return Source(f"parts/{path.name}", _parts.read_part(path, budget, index))
    except FormatError as exc:
        return Source(f"parts/{path.name}", None, str(exc))
    except MemoryError as exc:  # Arrow's allocator under a memory limit: this part cannot be held
        return Source(f"parts/{path.name}", None, f"unreadable: it does not fit in memory ({exc})")


def _disk_size(path: Path) -> int:
    """Bytes of a part file as the budget counts them (a part over the limit is refused anyway)."""
    from ledger._partcheck import MAX_PART_BYTES

    try:
        return min(path.stat().st_size, MAX_PART_BYTES)
    except OSError:
        return 0


def _safe_seq(record: memoryview) -> int:
    try:
        return decode_header(cast(bytes, record)).seq  # decode_header reads any buffer
    except FormatError:
        return 1 << 62  # keep malformed records: verify reports them


def wal_table(frames: _wal.WalFrames, rows: list[int], run_id: str | None) -> pa.Table:
    """The typed view of the log frames ``rows`` (built here: the log stores only the signed bytes),
    copying each record once, into the table.

    ``run_id`` comes from the parts; when the log holds the genesis, from its body."""
    records = [frames.record(i) for i in rows]
    headers = [decode_header(cast(bytes, r)) for r in records]  # both decoders read any buffer
    metrics = []
    for record, header in zip(records, headers, strict=True):
        try:
            body = decode_body(cast(bytes, record[HEADER_SIZE:]))
            metrics.append(list({k: float(v) for k, v in dict(body.get("metrics", {})).items()}.items()))
            if run_id is None and header.kind is Kind.GENESIS:
                run_id = str(body["run_id"])
        except (FormatError, TypeError, ValueError, AttributeError, KeyError, OverflowError):
            metrics.append([])
    starts = [frames.payloads[i][0] for i in rows]
    data, n = frames.data, len(rows)
    offsets = np.zeros(n + 1, np.int32)  # a log is at most 192 MiB
    np.cumsum([len(r) for r in records], out=offsets[1:])
    # binary columns built from one exact-size copy each (a builder would grow by doubling)
    arrays: dict[str, Any] = {
        "key_id": pa.FixedSizeBinaryArray.from_buffers(pa.binary(HASH_SIZE), n, [None, pa.py_buffer(
            b"".join(data[s:s + HASH_SIZE] for s in starts))]),
        "signature": pa.FixedSizeBinaryArray.from_buffers(pa.binary(SIGNATURE_SIZE), n, [None, pa.py_buffer(
            b"".join(data[s + HASH_SIZE:s + HASH_SIZE + SIGNATURE_SIZE] for s in starts))]),
        "record": pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(
            b"".join(records))]),
    }
    columns: dict[str, Any] = {
        "seq": [h.seq for h in headers],
        "kind": [h.kind.label for h in headers],
        "step": [h.step for h in headers],
        "time_ns": [h.time_ns for h in headers],
        "run_id": [run_id or ""] * n,
        "hash": [_leaf_hash(r) for r in records],
        "metrics": metrics,
    }
    return pa.Table.from_arrays([arrays[f.name] if f.name in arrays else typed_array(columns[f.name], f.type)
                                 for f in _parts.SCHEMA], schema=_parts.SCHEMA)


def _leaf_hash(record: memoryview) -> bytes:
    digest = hashlib.sha256(b"\x00")
    digest.update(record)
    return digest.digest()


def open(path: str | os.PathLike[str]) -> Ledger:  # noqa: A001 - the public name is ledger.open
    """Open a ledger directory for reading."""
    return Ledger(path)
