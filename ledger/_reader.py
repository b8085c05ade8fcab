"""Reading a ledger: parts plus the log tail, strictly read-only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ledger import _parts, _wal
from ledger._entry import Entry
from ledger._layout import Layout
from ledger._record import Kind
from ledger.errors import FormatError


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
                scan, wal_error = _wal.read(self.layout.wal), None
            except FormatError as exc:
                scan, wal_error = _wal.WalScan([], 0, b""), str(exc)
            if _parts.list_parts(self.layout.parts) == before:
                break
        sources: list[Source] = []
        last_seq, run_id = -1, None
        with ThreadPoolExecutor(2, thread_name_prefix="ledger-read") as pool:
            for future in [pool.submit(_read_source, p) for p in before]:
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
            tail = [e for e in scan.entries if _safe_seq(e) > last_seq]
            self.wal_torn = scan.torn
            tail_source = None
            if tail:
                try:
                    tail_source = Source("wal.log", wal_table(tail, run_id))
                except FormatError as exc:
                    tail_source = Source("wal.log", None, str(exc))
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


def _read_source(path: Path) -> Source:
    try:
        return Source(f"parts/{path.name}", _parts.read_part(path))
    except FormatError as exc:
        return Source(f"parts/{path.name}", None, str(exc))


def _safe_seq(entry: Entry) -> int:
    try:
        return entry.seq
    except FormatError:
        return 1 << 62  # keep malformed records: verify reports them


def wal_table(entries: list[Entry], run_id: str | None) -> pa.Table:
    """The typed view of log entries (built here: the log stores only the signed bytes).

    ``run_id`` comes from the parts; when the log holds the genesis, from its body."""
    metrics = []
    for entry in entries:
        try:
            body = entry.body()
            metrics.append({k: float(v) for k, v in dict(body.get("metrics", {})).items()})
            if run_id is None and entry.kind is Kind.GENESIS:
                run_id = str(body["run_id"])
        except (FormatError, TypeError, ValueError, AttributeError, KeyError, OverflowError):
            metrics.append({})
    return _parts.entries_table(entries, run_id or "", metrics)


def open(path: str | os.PathLike[str]) -> Ledger:  # noqa: A001 - the public name is ledger.open
    """Open a ledger directory for reading."""
    return Ledger(path)
