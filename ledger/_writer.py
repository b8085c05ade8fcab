"""The ledger writer: signs entries, appends them to the log, rolls the log into parts."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from ledger import _parts, _wal
from ledger._crypto import Signer, load_signer
from ledger._encoding import encode_body, metric_value
from ledger._entry import Entry
from ledger._layout import Layout
from ledger._record import (
    FORMAT_VERSION,
    PAYLOAD_TYPE,
    ZERO_HASH,
    Header,
    Kind,
    MerkleAccumulator,
    encode_record,
    run_digest,
)
from ledger.errors import ConfigurationError, LedgerLockedError, StorageError

Clock = Callable[[], int]
FSYNC_MODES = ("always", "group", "never")
GENESIS_RESERVED = ("format", "run_id", "created_ns", "public_key", "key_id", "payload_type")


@dataclass(frozen=True, slots=True)
class Recovery:
    """What opening an existing ledger found in its log."""

    recovered_entries: int
    torn_bytes: int
    torn_saved_to: Path | None


def _as_signer(key: Signer | str | os.PathLike[str], passphrase: bytes | None) -> Signer:
    if isinstance(key, Signer):
        return key
    if passphrase is None and os.environ.get("LEDGER_KEY_PASSPHRASE"):
        passphrase = os.environ["LEDGER_KEY_PASSPHRASE"].encode()
    return load_signer(key, passphrase)


class LedgerWriter:
    """Appends signed entries to one ledger directory. One writer per ledger (a lock file).

    ``append`` returns once the entry has reached the OS. ``fsync`` policy: ``"group"`` (default)
    fsyncs the log when at least ``fsync_interval`` seconds passed since the last fsync, and at
    every :meth:`sync`, roll-over and close; ``"always"`` fsyncs every append; ``"never"`` leaves
    it to the OS. Use :meth:`create` or :meth:`open`.
    """

    def __init__(self, layout: Layout, signer: Signer, *, lock: filelock.BaseFileLock, run_id: str,
                 head: bytes, next_seq: int, fsync: str, fsync_interval: float,
                 rollover_entries: int, rollover_bytes: int, clock: Clock) -> None:
        if fsync not in FSYNC_MODES:
            raise ConfigurationError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        if rollover_entries < 1 or rollover_bytes < 1:
            raise ConfigurationError("rollover_entries and rollover_bytes must be positive")
        self.layout, self._signer, self._lock = layout, signer, lock
        self.run_id, self._run_digest = run_id, run_digest(run_id)
        self.head, self.next_seq = head, next_seq
        self._fsync, self._fsync_interval, self._clock = fsync, fsync_interval, clock
        self._rollover_entries, self._rollover_bytes = rollover_entries, rollover_bytes
        self._pending: list[tuple[Entry, bytes, dict[str, float]]] = []  # entry, its hash, metrics
        self._manifest_parts: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._mutex = threading.Lock()
        self._last_sync = time.monotonic()
        self._wal = _wal.WalWriter(layout.wal)
        self._tree = MerkleAccumulator()
        self._last_step = -1
        self.sealed = False
        self.closed = False
        self.recovery = Recovery(0, 0, None)

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(cls, path: str | os.PathLike[str], key: Signer | str | os.PathLike[str], *,
               genesis: Mapping[str, Any] | None = None, run_id: str | None = None,
               passphrase: bytes | None = None, clock: Clock = time.time_ns, fsync: str = "group",
               fsync_interval: float = 1.0, rollover_entries: int = 8192,
               rollover_bytes: int = 64 << 20) -> LedgerWriter:
        """Start a new ledger at ``path`` (absent or an empty directory) and write its genesis.

        ``genesis`` holds the caller's fields; the writer adds the format version, run id,
        creation time, public key and key id (those names are reserved)."""
        signer = _as_signer(key, passphrase)
        layout = Layout(Path(path))
        if layout.root.exists() and (not layout.root.is_dir() or any(layout.root.iterdir())):
            what = "a ledger" if layout.is_ledger() else "not empty"
            raise ConfigurationError(f"{layout.root} is {what}; a new ledger needs an absent or empty directory")
        fields = dict(genesis or {})
        clash = sorted(set(fields) & set(GENESIS_RESERVED))
        if clash:
            raise ConfigurationError(f"genesis field names reserved by the format: {', '.join(clash)}")
        with _storage(f"create {layout.parts}"):
            layout.parts.mkdir(parents=True, exist_ok=True)
        lock = _acquire(layout)
        run_id = run_id or secrets.token_hex(16)
        writer = cls(layout, signer, lock=lock, run_id=run_id, head=ZERO_HASH, next_seq=0, fsync=fsync,
                     fsync_interval=fsync_interval, rollover_entries=rollover_entries,
                     rollover_bytes=rollover_bytes, clock=clock)
        created = clock()
        body = {**fields, "format": FORMAT_VERSION, "run_id": run_id, "created_ns": created,
                "public_key": signer.public.raw, "key_id": signer.public.key_id, "payload_type": PAYLOAD_TYPE}
        writer.append(Kind.GENESIS, -1, body, time_ns=created)
        writer.sync()
        return writer

    @classmethod
    def open(cls, path: str | os.PathLike[str], key: Signer | str | os.PathLike[str], *,
             passphrase: bytes | None = None, clock: Clock = time.time_ns, fsync: str = "group",
             fsync_interval: float = 1.0, rollover_entries: int = 8192,
             rollover_bytes: int = 64 << 20) -> LedgerWriter:
        """Reopen an existing, unsealed ledger to continue its chain (e.g. after a crash).

        Recovers the log: whole entries are rolled into a part; a torn last record is dropped
        from the log, its bytes kept in ``wal.torn.N`` and reported in :attr:`recovery`."""
        from ledger._reader import Ledger  # the reader decodes what is already on disk

        signer = _as_signer(key, passphrase)
        layout = Layout(Path(path)).require()
        lock = _acquire(layout)
        try:
            ledger = Ledger(layout.root)
            genesis, last = ledger.genesis_entry(), ledger.last_entry()
            if genesis.key_id != signer.public.key_id:
                raise ConfigurationError("this key did not sign the ledger's genesis; open it with the trainer's key")
            if last.kind is Kind.SEAL:
                raise ConfigurationError(f"{layout.root} is sealed; a sealed ledger takes no more entries")
            writer = cls(layout, signer, lock=lock, run_id=genesis.body()["run_id"], head=last.hash,
                         next_seq=last.seq + 1, fsync=fsync, fsync_interval=fsync_interval,
                         rollover_entries=rollover_entries, rollover_bytes=rollover_bytes, clock=clock)
            for entry in ledger.entries():
                writer._tree.add(entry.hash)
            writer._last_step = last.step
            writer._recover(ledger)
        except BaseException:
            lock.release()
            raise
        return writer

    def _recover(self, ledger: Any) -> None:
        tail, torn = ledger.wal_tail(), ledger.wal_torn
        saved = None
        if torn:
            n = 0
            while (self.layout.root / f"wal.torn.{n}").exists():
                n += 1
            saved = self.layout.root / f"wal.torn.{n}"
            saved.write_bytes(torn)
        if tail:
            self._pending = [(e, e.hash, _metrics_of(e)) for e in tail]
        self._roll(force_reset=bool(torn) or bool(tail) or self.layout.wal.stat().st_size > len(_wal.MAGIC))
        self.recovery = Recovery(len(tail), len(torn), saved)

    # ----------------------------------------------------------------- appending
    def append(self, kind: Kind | str, step: int, body: Mapping[str, Any], *, time_ns: int | None = None) -> Entry:
        """Sign and append one entry; returns it once it has reached the OS."""
        kind = Kind.parse(kind)
        if kind is Kind.GENESIS and self.next_seq != 0:
            raise ConfigurationError("only the first entry can be a genesis")
        metrics = {name: metric_value(v) for name, v in dict(body.get("metrics", {})).items()}
        body_bytes = encode_body(body)
        with self._mutex:
            if self.closed:
                raise ConfigurationError("the ledger writer is closed")
            header = Header(FORMAT_VERSION, kind, self.next_seq, int(step),
                            self._clock() if time_ns is None else time_ns, self._run_digest, self.head)
            record = encode_record(header, body_bytes)
            entry = Entry(record=record, signature=self._signer.sign(record), key_id=self._signer.public.key_id)
            frame = _wal.encode_frame(entry)
            with _storage(f"append entry {self.next_seq} to {self.layout.wal}"):
                self._wal.append(frame)
            self.head, self.next_seq, self._last_step = entry.hash, self.next_seq + 1, header.step
            self._tree.add(entry.hash)
            self._pending.append((entry, self.head, metrics))
            self._pending_bytes += len(frame)
            now = time.monotonic()
            with _storage(f"make {self.layout.wal} durable"):
                if self._fsync == "always" or (self._fsync == "group"
                                               and now - self._last_sync >= self._fsync_interval):
                    self._wal.fsync()
                    self._last_sync = now
                if len(self._pending) >= self._rollover_entries or self._pending_bytes >= self._rollover_bytes:
                    self._roll()
            return entry

    def sync(self) -> None:
        """Make everything appended so far durable (fsync the log), whatever the policy."""
        with self._mutex:
            if not self.closed and self._fsync != "never":
                with _storage(f"fsync {self.layout.wal}"):
                    self._wal.fsync()
                self._last_sync = time.monotonic()

    def seal(self, body: Mapping[str, Any] | None = None, *, step: int | None = None) -> Entry:
        """Append the seal (entry count, head, Merkle tree root of every entry before it) and
        close. ``body`` adds fields (e.g. the final weights' digests); ``step`` defaults to the
        last entry's step."""
        fields = dict(body or {})
        clash = sorted(set(fields) & {"entry_count", "head", "tree_root"})
        if clash:
            raise ConfigurationError(f"seal field names reserved by the format: {', '.join(clash)}")
        with self._mutex:
            fields.update({"entry_count": self.next_seq, "head": self.head, "tree_root": self._tree.root()})
            last_step = self._last_step
        entry = self.append(Kind.SEAL, last_step if step is None else step, fields)
        self.sealed = True
        self.close()
        return entry

    def close(self) -> None:
        """Roll the log into a final part, write the manifest, release the lock (idempotent)."""
        with self._mutex:
            if self.closed:
                return
            with _storage(f"roll {self.layout.wal} into a part"):
                self._roll()
            self._wal.close()
            self.closed = True
            self._lock.release()

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- roll-over
    def _roll(self, force_reset: bool = False) -> None:
        if self._pending:
            index = len(_parts.list_parts(self.layout.parts))
            table = _parts.entries_table([e for e, _, _ in self._pending], self.run_id,
                                         [m for _, _, m in self._pending], [h for _, h, _ in self._pending])
            path = self.layout.parts / _parts.part_name(index)
            _parts.write_part(path, table, self.run_id)
            self._manifest_parts.append({"name": path.name, **_parts.part_metadata(path)})
        if self._pending or force_reset:
            self._wal.close()
            tmp = self.layout.wal.with_name("wal.log.tmp")
            tmp.write_bytes(_wal.MAGIC)
            _parts.fsync_path(tmp)
            os.replace(tmp, self.layout.wal)
            _parts.fsync_path(self.layout.root)
            self._wal = _wal.WalWriter(self.layout.wal)
            self._pending, self._pending_bytes = [], 0
            self._write_manifest()
        self._last_sync = time.monotonic()

    def _write_manifest(self) -> None:
        known = {p["name"] for p in self._manifest_parts}
        for path in _parts.list_parts(self.layout.parts):  # parts written before this writer opened
            if path.name not in known:
                self._manifest_parts.append({"name": path.name, **_parts.part_metadata(path)})
        self._manifest_parts.sort(key=lambda p: p["name"])
        parts = self._manifest_parts
        _parts.write_json_atomic(self.layout.manifest, {
            "format": FORMAT_VERSION, "run_id": self.run_id, "key_id": self._signer.public.key_id.hex(),
            "entries": self.next_seq, "head": self.head.hex(), "sealed": self.sealed, "parts": parts,
        })


def _metrics_of(entry: Entry) -> dict[str, float]:
    return {k: metric_value(v) for k, v in entry.metrics().items()}


@contextlib.contextmanager
def _storage(what: str) -> Iterator[None]:
    """Turn an OS error while writing into :class:`StorageError` saying what could not be done."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"could not {what}: {exc.strerror or exc}") from exc


def _acquire(layout: Layout) -> filelock.BaseFileLock:
    lock = filelock.FileLock(layout.lock)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise LedgerLockedError(f"{layout.root} is open by another writer; close it first "
                                "(readers and `ledger verify` need no lock)") from None
    return lock
