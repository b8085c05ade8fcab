"""The ledger writer: signs entries, appends them to the log, rolls the log into parts."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger import _parts, _wal
from ledger._chain import ChainBreak, check_chain, linked
from ledger._crypto import Signer, load_signer
from ledger._encoding import encode_body, metric_value
from ledger._entry import Entry
from ledger._heads import unpublished, write_head
from ledger._layout import DirectoryLock, Layout, create_file, fsync_dir, make_dirs, remove_dirs, unlink_quietly
from ledger._note import TreeHead, note_from_signature, origin_of
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
from ledger.errors import ConfigurationError, FormatError, StorageError

Clock = Callable[[], int]
OnHead = Callable[[int, bytes], None]  # (size, signed note): called once heads/<size>.note is durable
FSYNC_MODES = ("always", "group", "never")
ROLLOVER_BYTES_MAX = _wal.MAX_LOG - _wal.MAX_FRAME  # a roll at this size plus one frame stays within MAX_LOG
GENESIS_RESERVED = ("format", "run_id", "created_ns", "public_key", "key_id", "payload_type")


@dataclass(frozen=True, slots=True)
class Recovery:
    """What opening an existing ledger found in its log."""

    recovered_entries: int
    torn_bytes: int
    torn_saved_to: Path | None
    set_aside_entries: int = 0  # whole frames found after a torn one (kept in torn_saved_to, not chained)


def _as_signer(key: Signer | str | os.PathLike[str], passphrase: bytes | None) -> Signer:
    if isinstance(key, Signer):
        return key
    if passphrase is None and os.environ.get("LEDGER_KEY_PASSPHRASE"):
        passphrase = os.environ["LEDGER_KEY_PASSPHRASE"].encode()
    return load_signer(key, passphrase)


class LedgerWriter:
    """Appends signed entries to one ledger directory. One writer per ledger (an ``flock`` on the
    directory itself).

    ``append`` returns once the entry has reached the OS. ``fsync`` policy: ``"group"`` (default)
    fsyncs the log when at least ``fsync_interval`` seconds passed since the last fsync, and at
    every :meth:`sync`, roll-over and close; ``"always"`` fsyncs every append; ``"never"`` leaves
    it to the OS, except before a checkpoint's signed tree head (every mode fsyncs the entries a
    head covers before signing it). Use :meth:`create` or :meth:`open`.

    When the disk refuses a write, :class:`StorageError` is raised and nothing of that entry stays
    in the log; the writer goes on when space returns. A roll-over that fails while appending is
    retried later (its entries stay in the log); one that fails in :meth:`close` raises and
    :meth:`close` can be called again.
    """

    def __init__(self, layout: Layout, signer: Signer, *, lock: DirectoryLock, run_id: str,
                 head: bytes, next_seq: int, fsync: str, fsync_interval: float,
                 rollover_entries: int, rollover_bytes: int, clock: Clock, on_head: OnHead | None = None) -> None:
        if fsync not in FSYNC_MODES:
            raise ConfigurationError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        if not 1 <= rollover_entries <= _wal.MAX_LOG_FRAMES or not 1 <= rollover_bytes <= ROLLOVER_BYTES_MAX:
            raise ConfigurationError(f"rollover_entries must be 1 to {_wal.MAX_LOG_FRAMES} and rollover_bytes 1 to "
                                     f"{ROLLOVER_BYTES_MAX} (larger logs are refused by readers)")
        self.layout, self._signer, self._lock = layout, signer, lock
        self.run_id, self._run_digest = run_id, run_digest(run_id)
        self.head, self.next_seq = head, next_seq
        self._fsync, self._fsync_interval, self._clock = fsync, fsync_interval, clock
        self._rollover_entries, self._rollover_bytes = rollover_entries, rollover_bytes
        self._pending: list[tuple[Entry, bytes, dict[str, float]]] = []  # entry, its hash, metrics
        self._manifest_parts: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._log_stale = False  # the log still holds frames already written to a part
        self._manifest_stale = False
        self._roll_retry_seq = 0  # after a failed roll while appending, retry from this seq on
        self._mutex = threading.Lock()
        self._last_sync = time.monotonic()
        with _storage(f"open {layout.wal}"):
            self._wal = _wal.WalWriter(layout.wal)
        self._tree = MerkleAccumulator()
        self._last_head: tuple[int, bytes] | None = None  # (size, note) of the head the last checkpoint got
        self._last_step = -1
        self.sealed = False
        self.closed = False
        self.recovery = Recovery(0, 0, None)
        self._moved: str | None = None  # why the ledger's path no longer names the locked directory
        self.on_head = on_head  # called with (size, note) after each heads/<size>.note is durable
        try:
            self._origin: str | None = origin_of(run_id)
        except FormatError as exc:
            self._origin = None
            warnings.warn(f"no tree heads for this ledger: {exc}", RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(cls, path: str | os.PathLike[str], key: Signer | str | os.PathLike[str], *,
               genesis: Mapping[str, Any] | None = None, run_id: str | None = None,
               passphrase: bytes | None = None, clock: Clock = time.time_ns, fsync: str = "group",
               fsync_interval: float = 1.0, rollover_entries: int = 8192,
               rollover_bytes: int = 64 << 20, on_head: OnHead | None = None) -> LedgerWriter:
        """Start a new ledger at ``path`` (absent or an empty directory) and write its genesis.

        ``genesis`` holds the caller's fields; the writer adds the format version, run id,
        creation time, public key and key id (those names are reserved). ``on_head(size, note)``
        is called after each signed tree head is durable in ``heads/`` (docs/FORMAT.md §13). On any
        failure nothing that this call created is left behind."""
        signer = _as_signer(key, passphrase)
        layout = Layout(Path(path))
        if isinstance(run_id, str) and run_id:
            try:
                origin_of(run_id)
            except FormatError as exc:  # a ledger that could never carry signed tree heads: refused
                raise ConfigurationError(f"run_id cannot name this ledger's signed tree heads ({exc}); "
                                         "choose a shorter run id") from None
        fields = dict(genesis or {})
        clash = sorted(set(fields) & set(GENESIS_RESERVED))
        if clash:
            raise ConfigurationError(f"genesis field names reserved by the format: {', '.join(clash)}")
        _require_empty(layout)
        with _storage(f"create {layout.root}"):
            made = make_dirs(layout.root)
        lock: DirectoryLock | None = None
        writer: LedgerWriter | None = None
        ours = False  # the directory's content is this call's to remove
        try:
            lock = DirectoryLock(layout.root)
            _require_empty(layout)  # again, now that no other writer can start here
            ours = True
            with _storage(f"create {layout.parts}"):
                os.mkdir(layout.parts)
            run_id = run_id or secrets.token_hex(16)
            writer = cls(layout, signer, lock=lock, run_id=run_id, head=ZERO_HASH, next_seq=0, fsync=fsync,
                         fsync_interval=fsync_interval, rollover_entries=rollover_entries,
                         rollover_bytes=rollover_bytes, clock=clock, on_head=on_head)
            created = clock()
            body = {**fields, "format": FORMAT_VERSION, "run_id": run_id, "created_ns": created,
                    "public_key": signer.public.raw, "key_id": signer.public.key_id, "payload_type": PAYLOAD_TYPE}
            writer.append(Kind.GENESIS, -1, body, time_ns=created)
            writer.sync()
        except BaseException:
            if writer is not None:
                writer._wal.close()
            if ours:
                _undo_create(layout)
            if lock is not None:
                lock.release()
            remove_dirs(made)  # only directories this call made, and only when empty
            raise
        return writer

    @classmethod
    def open(cls, path: str | os.PathLike[str], key: Signer | str | os.PathLike[str], *,
             passphrase: bytes | None = None, clock: Clock = time.time_ns, fsync: str = "group",
             fsync_interval: float = 1.0, rollover_entries: int = 8192,
             rollover_bytes: int = 64 << 20, on_head: OnHead | None = None) -> LedgerWriter:
        """Reopen an existing, unsealed ledger to continue its chain (e.g. after a crash).

        Recovers the log: whole entries are rolled into a part; a torn frame and anything after it
        is dropped from the log, its bytes kept in ``wal.torn.N`` and reported in :attr:`recovery`.
        Refuses (:class:`FormatError`) a ledger whose entries do not form one chain: two entries
        with the same seq, a gap, or a prev-hash that does not link."""
        from ledger._reader import Ledger  # the reader decodes what is already on disk

        signer = _as_signer(key, passphrase)
        layout = Layout(Path(path)).require()
        lock = DirectoryLock(layout.root)
        writer: LedgerWriter | None = None
        try:
            ledger = Ledger(layout.root)
            genesis, last = ledger.genesis_entry(), ledger.last_entry()
            if genesis.key_id != signer.public.key_id:
                raise ConfigurationError("this key did not sign the ledger's genesis; open it with the trainer's key")
            if last.kind is Kind.SEAL:
                written = _final_head(ledger, layout, signer, genesis.body()["run_id"])
                raise ConfigurationError(f"{layout.root} is sealed; a sealed ledger takes no more entries"
                                         + ("; its final signed tree head, missing from heads/, was written"
                                            if written else ""))
            hashes, checkpoints = _one_chain(ledger, layout)
            writer = cls(layout, signer, lock=lock, run_id=genesis.body()["run_id"], head=last.hash,
                         next_seq=last.seq + 1, fsync=fsync, fsync_interval=fsync_interval,
                         rollover_entries=rollover_entries, rollover_bytes=rollover_bytes, clock=clock,
                         on_head=on_head)
            for entry_hash in hashes:
                writer._tree.add(entry_hash)
            writer._last_step = last.step
            with _storage(f"recover the log of {layout.root} (nothing was changed)"):
                writer._recover(ledger)
            if writer._origin is not None:  # heads a crash left out of heads/ (killed after the entry)
                for size, note in unpublished(layout.root, writer._origin, signer.public.raw, checkpoints):
                    writer._publish(size, note)
        except BaseException:
            if writer is not None:
                writer._wal.close()
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
            create_file(saved, torn)
            fsync_dir(self.layout.root)
        try:
            if tail:
                self._pending = [(e, e.hash, _metrics_of(e)) for e in tail]
            self._roll(force_reset=bool(torn) or bool(tail) or self.layout.wal.stat().st_size > len(_wal.MAGIC))
        except BaseException:
            with contextlib.suppress(OSError):
                if saved is not None and self.layout.wal.stat().st_size > len(_wal.MAGIC):
                    unlink_quietly(saved)  # the log still holds those bytes; the next open saves them again
            raise
        self.recovery = Recovery(len(tail), len(torn), saved, _wal.count_frames(torn, self._signer.public.key_id))

    # ----------------------------------------------------------------- appending
    def append(self, kind: Kind | str, step: int, body: Mapping[str, Any], *, time_ns: int | None = None) -> Entry:
        """Sign and append one entry; returns it once it has reached the OS. A
        :class:`StorageError` means the entry is not in the ledger (unless the message says it
        reached the log and only the fsync failed). A checkpoint entry gets ``tree_head``, the
        signed head of the entries before it, also written to ``heads/`` (docs/FORMAT.md §13)."""
        kind = Kind.parse(kind)
        if kind is Kind.GENESIS and self.next_seq != 0:
            raise ConfigurationError("only the first entry can be a genesis")
        metrics = {name: metric_value(v) for name, v in dict(body.get("metrics", {})).items()}
        with_head = kind is Kind.CHECKPOINT and self._origin is not None
        if with_head and "tree_head" in body:  # the writer's head of this ledger replaces a copied one
            body = {name: value for name, value in body.items() if name != "tree_head"}
        body_bytes = b"" if with_head else encode_body(body)
        published: tuple[int, bytes] | None = None
        with self._mutex:
            entry = self._append(kind, step, body, body_bytes, metrics, time_ns, with_head)
            if with_head:
                published = self._last_head
        if published is not None:
            self._publish(*published)
        return entry

    def _signed_head(self) -> tuple[TreeHead, bytes]:
        """The head of the entries so far and its signature (caller holds the mutex)."""
        assert self._origin is not None
        head = TreeHead(self._origin, self.next_seq, self._tree.root())
        return head, self._signer.sign_bytes(head.text())

    def _publish(self, size: int, note: bytes) -> None:
        """Write ``heads/<size>.note`` durably, then tell ``on_head``. Called once the entries the
        head covers are durable (fsynced). Never fails the append: the ledger holds the head
        already; a failure is a warning (the file is for publishing)."""
        if self._moved is not None or (not self.closed and self._lock.moved() is not None):
            warnings.warn(f"heads/{size}.note not written: the ledger directory moved", RuntimeWarning, stacklevel=3)
            return
        try:
            write_head(self.layout.root, size, note)
        except (OSError, FormatError) as exc:
            warnings.warn(f"could not write heads/{size}.note ({_reason(exc)}); the ledger holds the head",
                          RuntimeWarning, stacklevel=3)
            return
        if self.on_head is not None:
            try:
                self.on_head(size, note)
            except Exception as exc:  # noqa: BLE001 - a publisher's failure must not stop the writer
                warnings.warn(f"on_head({size}) failed: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=3)

    def _append(self, kind: Kind, step: int, body: Mapping[str, Any], body_bytes: bytes,
                metrics: dict[str, float], time_ns: int | None, with_head: bool) -> Entry:
        """The body of :meth:`append`, under the mutex."""
        if self.closed:
            raise ConfigurationError("the ledger writer is closed")
        if self.sealed:
            raise ConfigurationError("the ledger is sealed; a sealed ledger takes no more entries")
        if with_head:
            # in every fsync mode, "never" included: a head is signed only over entries that survive a
            # power loss (else an honest resume forks from heads/<size>.note; one fsync per checkpoint)
            with _storage(f"fsync {self.layout.wal} before signing head {self.next_seq}"):
                self._wal.fsync()
            self._last_sync = time.monotonic()
            head, signature = self._signed_head()
            body_bytes = encode_body({**body, "tree_head": {"size": head.size, "root": head.root,
                                                            "signature": signature}})
            self._last_head = (head.size, note_from_signature(head, self._signer.public.raw, signature))
        header = Header(FORMAT_VERSION, kind, self.next_seq, int(step),
                        self._clock() if time_ns is None else time_ns, self._run_digest, self.head)
        record = encode_record(header, body_bytes)
        entry = Entry(record=record, signature=self._signer.sign(record), key_id=self._signer.public.key_id)
        frame = _wal.encode_frame(entry)
        self._make_room(len(frame))
        with _storage(f"append entry {self.next_seq} to {self._wal.path}"):
            self._wal.append(frame)
        self.head, self.next_seq, self._last_step = entry.hash, self.next_seq + 1, header.step
        self._tree.add(self.head)
        self._pending.append((entry, self.head, metrics))
        self._pending_bytes += len(frame)
        now = time.monotonic()
        if self._fsync == "always" or (self._fsync == "group" and now - self._last_sync >= self._fsync_interval):
            with _storage(f"fsync {self._wal.path} (entry {header.seq} is in the log but may not be durable)"):
                self._wal.fsync()
            self._last_sync = now
        if (len(self._pending) >= self._rollover_entries or self._pending_bytes >= self._rollover_bytes) \
                and self.next_seq >= self._roll_retry_seq:
            try:
                self._roll()
            except (OSError, StorageError) as exc:
                # every entry is still in the log: keep appending, retry the roll later
                self._roll_retry_seq = self.next_seq + min(self._rollover_entries, 64)
                warnings.warn(f"could not roll {self.layout.wal} into a part ({_reason(exc)}); its entries "
                              "stay in the log and the roll is retried", RuntimeWarning, stacklevel=2)
        return entry

    def _make_room(self, frame_bytes: int) -> None:
        """Roll the log into a part first when this frame would take it past what readers accept
        (:data:`~ledger._wal.MAX_LOG` bytes, :data:`~ledger._wal.MAX_LOG_FRAMES` frames): only after
        failed rolls; if the roll fails again, the entry is refused, never written past the caps."""
        if len(_wal.MAGIC) + self._pending_bytes + frame_bytes <= _wal.MAX_LOG \
                and len(self._pending) < _wal.MAX_LOG_FRAMES:
            return
        try:
            self._roll()
        except (OSError, StorageError) as exc:
            raise StorageError(f"{self.layout.wal} holds {len(self._pending)} entries, as many as readers accept, "
                               f"and could not be rolled into a part ({_reason(exc)}); free space and append "
                               "again") from exc

    def sync(self) -> None:
        """Make everything appended so far durable (fsync the log), whatever the policy."""
        with self._mutex:
            if not self.closed and self._fsync != "never":
                with _storage(f"fsync {self.layout.wal}"):
                    self._wal.fsync()
                self._last_sync = time.monotonic()

    def seal(self, body: Mapping[str, Any] | None = None, *, step: int | None = None) -> Entry:
        """Append the seal (entry count, head, Merkle tree root of every entry before it), close,
        and write the final signed tree head (all entries, the seal included) to ``heads/``.
        ``body`` adds fields (e.g. the final weights' digests); ``step`` defaults to the
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
        final = None
        if self._origin is not None:
            with self._mutex:  # the head of the whole ledger, seal included: it can only be beside it
                head, signature = self._signed_head()
                final = (head.size, note_from_signature(head, self._signer.public.raw, signature))
        self.close()
        if final is not None:
            self._publish(*final)
        return entry

    def close(self) -> None:
        """Roll the log into a final part, write the manifest, release the lock (idempotent).

        If the disk refuses, raises :class:`StorageError` and stays open: every entry is still in
        the log, and ``close()`` can be called again (or the ledger reopened) when there is space;
        :meth:`release` gives up instead. A writer broken by an earlier failure only releases its
        lock: reopening recovers the log. A ledger directory moved under the writer is never
        written by its old path: the lock is released and :class:`StorageError` says so."""
        with self._mutex:
            if self.closed:
                return
            if self._wal.broken is None:
                try:
                    with _storage(f"roll {self.layout.wal} into a part (every entry is still in the log; close "
                                  "again when there is space, or reopen the ledger)"):
                        self._roll()
                except StorageError:
                    if self._moved is None:
                        raise
            self._release()
            if self._moved is not None:
                raise StorageError(self._moved)

    def release(self) -> None:
        """Close the log and release the lock without rolling (idempotent): for giving up after a
        failed :meth:`close`. Every appended entry stays in the log; :meth:`open` recovers it."""
        with self._mutex:
            if not self.closed:
                self._release()

    def _release(self) -> None:
        self._wal.close()
        self.closed = True
        self._lock.release()

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- roll-over
    def _roll(self, force_reset: bool = False) -> None:
        """Pending entries → the next part; then the log → an empty one; then the manifest. Each
        step either happens or leaves the state as it was, so a failed roll can simply be retried.
        Refused (and the writer broken) once the ledger's path no longer names the locked directory."""
        self._check_place()
        if self._pending:
            self._write_pending_part()
        if self._log_stale or force_reset:
            fresh = _wal.fresh_log(self.layout.wal)
            try:
                os.replace(fresh.path, self.layout.wal)
            except BaseException:
                fresh.close()
                unlink_quietly(fresh.path)
                raise
            self._wal.close()
            fresh.path, self._wal = self.layout.wal, fresh
            self._log_stale, self._pending_bytes, self._manifest_stale = False, 0, True
            fsync_dir(self.layout.root)
        if self._manifest_stale:
            self._write_manifest()
            self._manifest_stale = False
        self._last_sync = time.monotonic()

    def _check_place(self) -> None:
        """Raise :class:`StorageError` (and break the writer) when the ledger directory was renamed,
        removed or replaced since it was locked: a roll writes parts, the log and the manifest by
        path, which would land in whatever directory now has that name."""
        if self._moved is None:
            why = self._lock.moved()
            if why is None:
                return
            self._moved = (f"the ledger directory moved under its writer: {why}; nothing more is written by "
                           f"that path (every entry is in the log of the locked directory: open that one where "
                           "it now is to recover it)")
            self._wal.broken = self._wal.broken or self._moved
        raise StorageError(self._moved)

    def _write_pending_part(self) -> None:
        index = len(_parts.list_parts(self.layout.parts))
        if index >= _parts.MAX_PARTS:
            raise StorageError(f"{self.layout.root} holds {index} parts, the most a reader reads; start a new ledger "
                               "(or roll less often: rollover_entries, rollover_bytes)")
        table = _parts.entries_table([e for e, _, _ in self._pending], self.run_id,
                                     [m for _, _, m in self._pending], [h for _, h, _ in self._pending])
        path = self.layout.parts / _parts.part_name(index)
        try:
            self._manifest_parts.append({"name": path.name, **_parts.write_part(path, table, self.run_id)})
        except OSError:
            if not path.exists():
                raise  # nothing changed
            # renamed into place, only the directory's fsync failed: the part is written
            self._pending, self._log_stale, self._manifest_stale = [], True, True
            raise
        self._pending, self._log_stale, self._manifest_stale = [], True, True

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


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


@contextlib.contextmanager
def _storage(what: str) -> Iterator[None]:
    """Turn an OS error while writing into :class:`StorageError` saying what could not be done."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"could not {what}: {exc.strerror or exc}") from exc


def _require_empty(layout: Layout) -> None:
    try:
        if layout.root.exists() and (not layout.root.is_dir() or any(layout.root.iterdir())):
            what = "a ledger" if layout.is_ledger() else "not empty" if layout.root.is_dir() else "a file"
            raise ConfigurationError(f"{layout.root} is {what}; a new ledger needs an absent or empty directory")
    except OSError as exc:
        raise StorageError(f"cannot look into {layout.root}: {exc.strerror or exc}") from exc


def _undo_create(layout: Layout) -> None:
    """Remove what a failed :meth:`LedgerWriter.create` wrote inside the ledger directory (the
    log, the manifest, parts/ and the parts in it, their temporary files)."""
    for name in ("wal.log", "wal.log.tmp", "manifest.json", "manifest.json.tmp"):
        unlink_quietly(layout.root / name)
    with contextlib.suppress(OSError):
        for path in list(layout.parts.iterdir()):
            if path.name.endswith((".parquet", ".parquet.tmp")):
                unlink_quietly(path)
    with contextlib.suppress(OSError):
        os.rmdir(layout.parts)


def _final_head(ledger: Any, layout: Layout, signer: Signer, run_id: str) -> bool:
    """Write the final signed tree head of a sealed ledger when ``heads/`` lacks it (a writer
    killed between the seal and that file): the same note :meth:`LedgerWriter.seal` writes
    (Ed25519 is deterministic). True when written; a failure is a warning."""
    try:
        origin = origin_of(run_id)
        size = ledger.last_entry().seq + 1
        if os.path.lexists(layout.root / "heads" / f"{size}.note"):
            return False
        # the key signs only what it signed before: every entry's signature, and a seal whose count,
        # head and root are those of the entries before it (an edited seal still links: nothing follows it)
        entries = list(ledger.entries())
        check_chain(entries, signer.public.raw)
        tree = MerkleAccumulator()
        for entry_hash in _one_chain(ledger, layout)[0][:-1]:
            tree.add(entry_hash)
        seal = entries[-1].body()
        if (seal.get("entry_count"), seal.get("head"), seal.get("tree_root")) != (
                size - 1, entries[-2].hash, tree.root()):
            raise FormatError("its seal's entry count, head or tree root is not that of the entries before it")
        tree.add(entries[-1].hash)
        if layout.wal.exists():  # the seal may still be in the log only: durable before it is signed
            fd = os.open(layout.wal, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        head = TreeHead(origin, tree.size, tree.root())
        return write_head(layout.root, head.size, note_from_signature(head, signer.public.raw,
                                                                      signer.sign_bytes(head.text())))
    except (OSError, FormatError) as exc:
        warnings.warn(f"the sealed ledger's final head is missing from heads/ and could not be written "
                      f"({_reason(exc)})", RuntimeWarning, stacklevel=3)
        return False


def _one_chain(ledger: Any, layout: Layout) -> tuple[list[bytes], list[tuple[int, Any]]]:
    """Entry hashes of a ledger whose entries form one chain: seq 0, 1, 2 … each linking to the
    one before; a log frame for a seq a part already holds must be that same entry. Otherwise
    :class:`FormatError` naming the seq (a fork: two writers, or a copied and diverged ledger).
    Also (seq, body) of every checkpoint entry (their signed heads)."""
    stale: dict[int, bytes] = {}
    for entry in _wal.read(layout.wal).entries:
        with contextlib.suppress(FormatError):
            stale.setdefault(entry.seq, entry.hash)
    hashes: list[bytes] = []
    checkpoints: list[tuple[int, Any]] = []
    try:
        for entry in linked(ledger.entries()):
            entry_hash = entry.hash
            if stale.get(entry.seq, entry_hash) != entry_hash:
                raise ChainBreak(f"two different entries with seq {entry.seq} (one in a part, one in wal.log)")
            hashes.append(entry_hash)
            if entry.kind is Kind.CHECKPOINT:
                with contextlib.suppress(FormatError):  # an unreadable body: verify names it
                    checkpoints.append((entry.seq, entry.body()))
    except ChainBreak as exc:
        raise FormatError(f"{layout.root} has {exc}: the chain is forked or broken; a writer cannot continue it "
                          "(run `ledger verify` for details)") from None
    return hashes, checkpoints
