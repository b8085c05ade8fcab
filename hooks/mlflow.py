"""Mirroring a ledger into an MLflow tracking server (needs the ``mlflow`` extra; ``mlflow-skinny``
is enough on the client side).

``Recorder(..., mlflow=True)`` or ``mlflow=MlflowSink(...)``: the run is created or attached before
genesis is written (genesis ``config["mlflow"]`` names it), then one background :class:`Mirror`
thread copies the ledger into it *from the ledger's files*: it keeps a cursor (the last mirrored
seq), reads what was appended after it, and sends ``log_batch`` calls within MLflow's limits. The
training thread never calls MLflow. A server that is down or slow only delays the mirror (it
retries with a bounded backoff; nothing is buffered but the cursor, the ledger holds the rest);
at close the recorder waits a bounded time and records in the seal how far the mirror got.
``ledger mlflow sync LEDGER`` pushes what is missing later, idempotently (the run's
``ledger.mirrored_seq`` tag is the cursor, updated in the same ``log_batch`` as the metrics).

What the run holds (docs/FORMAT.md §12 and issue #12's contract): every step entry's metrics at the
ledger's step and time; genesis ``config`` flattened with ``.`` as params, plus ``ledger.seed``;
tags ``ledger.run_id``, ``ledger.key_id``, ``ledger.format``, ``ledger.head``, ``ledger.entries``,
``ledger.mirrored_seq``, ``ledger.owned``; artifacts ``ledger/key.pub``, ``ledger/parts/*``
(closed parts as they roll, every part after close) and ``ledger/heads/*`` (signed tree heads and
their timestamps as they are written), so a download of ``ledger/`` is a ledger.
Names MLflow refuses are not mirrored (``ledger._mirror.accepts_name``); a param the run already
holds with another value is left as it is and named (a warning, ``ledger.owned``'s ``conflicts``).
The set-up (params, key, static tags; ``ledger.format`` last) is decided by what the run holds and
done before any metric, so a failed set-up is retried by the next pass or by ``sync``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ledger import _parts, _wal
from ledger._crypto import public_key_pem
from ledger._layout import Layout
from ledger._mirror import OWNED_TAGS, TAG_CHARS, accepts_name, is_head_file, params_of
from ledger._reader import _safe_seq, wal_table
from ledger._record import Kind
from ledger.errors import ConfigurationError

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's limits per log_batch call
CLOSE_TIMEOUT = 30.0  # seconds close() waits for the mirror, by default
INTERVAL = 5.0  # seconds between the mirror's passes (each costs a request or two: ~15 ms of client CPU)
MAX_BACKOFF = 30.0
# MLflow's own HTTP retries (7, backoff factor 2) would hold a request for minutes on a dead server;
# the mirror retries by itself. Set only when the user has not set them.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=tracking_uri)


@dataclass
class MlflowSink:
    """Where a recorder mirrors to. ``tracking_uri`` None: MLflow's configured one. ``run_id``: attach
    to that run; else ``experiment`` (a name, created when absent; None: the default experiment) and
    ``run_name`` for a new run. ``close_timeout``: how long ``Recorder.close`` waits for the mirror.
    ``interval``: seconds between the mirror's passes over the ledger. Opening a sink sets MLflow's
    HTTP retry settings (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 1, ``…_BACKOFF_FACTOR`` 1, ``…_TIMEOUT``
    20 s) in this process unless they are set: the mirror retries by itself, with a backoff up to
    30 s, and MLflow's defaults would hold one request for minutes on a dead server."""

    tracking_uri: str | None = None
    experiment: str | None = None
    run_id: str | None = None
    run_name: str | None = None
    close_timeout: float = CLOSE_TIMEOUT
    interval: float = INTERVAL

    def open(self, active: bool = False) -> tuple[dict[str, Any], bool]:
        """Create or attach the run (``active``: MLflow's active run when there is one); return
        genesis ``config["mlflow"]`` and whether this call created the run."""
        import mlflow

        uri = self.tracking_uri or mlflow.get_tracking_uri()
        client = _client(uri)
        run_id, created = self.run_id, False
        if run_id is None and active and (run := mlflow.active_run()) is not None:
            run_id = run.info.run_id
        try:
            if run_id is not None:
                experiment_id = client.get_run(run_id).info.experiment_id
            else:
                experiment_id = "0"
                if self.experiment is not None:
                    found = client.get_experiment_by_name(self.experiment)
                    experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
                run = client.create_run(experiment_id, run_name=self.run_name)
                run_id, created = run.info.run_id, True
        except Exception as exc:  # the server is unreachable, the run does not exist, …
            raise ConfigurationError(f"could not {'attach MLflow run ' + run_id if run_id else 'create an MLflow run'}"
                                     f" at {uri}: {_short(exc)}") from None
        self.run_id, self.tracking_uri = run_id, uri
        return {"tracking_uri": _redacted(uri), "experiment_id": experiment_id, "run_id": run_id}, created


def named_offline(sink: MlflowSink) -> dict[str, Any]:
    """The run a sink with a ``run_id`` names, without contacting the server (a resume goes on while the
    server is down: the mirror retries in the background)."""
    import mlflow

    sink.tracking_uri = sink.tracking_uri or mlflow.get_tracking_uri()
    return {"tracking_uri": _redacted(sink.tracking_uri), "run_id": sink.run_id}


def _redacted(uri: str) -> str:
    """The tracking URI without a ``user:password@`` part (genesis records it; credentials stay out)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def sink_of(option: Any) -> MlflowSink | None:
    """The sink a ``mlflow=`` option names (None, False, True or an :class:`MlflowSink`)."""
    if option is None or option is False:
        return None
    if option is True:
        return MlflowSink()
    if isinstance(option, MlflowSink):
        return option
    raise ConfigurationError(f"mlflow= takes True or an MlflowSink, not {type(option).__name__}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


@dataclass(frozen=True, slots=True)
class Progress:
    """How far one mirroring went: metrics logged, parts uploaded, the cursor after it."""

    metrics: int
    parts: int
    cursor: int


class Mirror:
    """Copies one ledger into one MLflow run. :meth:`push` does one pass (read what follows the
    cursor, log it, upload new parts); :meth:`start` runs passes on a background thread."""

    def __init__(self, path: str | os.PathLike[str], run_id: str, tracking_uri: str | None, *,
                 interval: float = INTERVAL, created: bool = False) -> None:
        self.layout = Layout(Path(path))
        self.run_id, self.tracking_uri, self.interval, self.created = run_id, tracking_uri, interval, created
        self.client = _client(tracking_uri)
        self.cursor: int | None = None  # the last mirrored seq (None: not read from the run yet)
        self.error: str | None = None  # the last failure, while failing
        self.failures = 0
        self._uploaded: set[str] | None = None
        self._heads_uploaded: set[str] | None = None
        self._spans: dict[str, int] = {}  # part name -> its last seq
        self._wal_at = (0, 0, 0)  # (device, inode, byte offset) of the log read up to (a roll replaces the file)
        self._wal_ends: list[tuple[int, int]] = []  # (seq, end offset) of the frames read in this pass
        self._names: set[str] = set()  # metric names mirrored (for the ledger.owned tag)
        self.refused: set[str] = set()  # metric names MLflow does not accept: not mirrored
        self.conflicts: set[str] = set()  # params the run held with other values before the mirror
        self.cpu_seconds = 0.0  # the mirror thread's CPU time (docs/PERFORMANCE.md)
        self._set_up = False
        self._held: dict[str, str] = {}  # the run's params when the mirror first read it
        self._params: set[str] = set()  # the params the ledger owns
        self._wake = threading.Event()
        self._changed = threading.Condition()
        self._final = self._stop = False
        self._done = False  # the final pass succeeded
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- one pass
    def push(self, final: bool = False) -> Progress:
        """One pass: set the run up when it is not (params, the key, static tags), log every entry after
        the cursor, upload parts not uploaded yet (``final``: after close, also the owned-keys tag).
        Raises on failure; what was logged before the failure stays logged and the cursor says so."""
        from mlflow.entities import Metric, RunTag

        if self.cursor is None:
            run = self.client.get_run(self.run_id)
            tags = run.data.tags
            self.cursor = int(tags.get("ledger.mirrored_seq", -1))
            self._set_up = "ledger.format" in tags  # set last by _setup: the run holds params and key
            self._held = dict(run.data.params)
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                self._names.update(json.loads(tags.get("ledger.owned", "{}")).get("metrics", []))
        if self._uploaded is None:
            self._uploaded = {Path(f.path).name for f in self.client.list_artifacts(self.run_id, "ledger/parts")}
        if not self._set_up:  # before any metric: a cursor past genesis never skips the set-up
            self._setup(RunTag)
        logged = 0
        for table in self._tables():
            rows = zip(table["seq"].to_pylist(), table["kind"].to_pylist(), table["step"].to_pylist(),
                       table["time_ns"].to_pylist(), table["hash"].to_pylist(), table["metrics"].to_pylist(),
                       strict=True)
            metrics: list[Any] = []
            done, head = self.cursor, b""
            for seq, kind, step, time_ns, digest, values in rows:
                if seq != done + 1:  # a gap (a roll between two reads): the next pass reads it
                    break
                if kind == Kind.STEP.label:
                    for name, value in values or ():
                        if not accepts_name(name):  # MLflow would refuse the whole batch
                            self.refused.add(name)
                            continue
                        metrics.append(Metric(name, float("nan") if value is None else float(value),
                                              int(time_ns) // 1_000_000, int(step)))
                        self._names.add(name)
                        if len(metrics) >= MAX_METRICS - 3:
                            logged += self._log(metrics, done, head, RunTag)
                            metrics = []
                done, head = seq, digest
            if done > self.cursor or metrics:
                logged += self._log(metrics, done, head, RunTag)
        self._advance_log()
        parts = self._upload_parts()
        if final:
            self._owned_tag()
        return Progress(logged, parts, self.cursor)

    def _owned_tag(self) -> None:
        """The ``ledger.owned`` tag: the keys the mirror wrote (informative; the check re-derives them)."""
        owned = {"metrics": sorted(self._names), "params": sorted(self._params), "tags": list(OWNED_TAGS),
                 "refused": sorted(self.refused), "conflicts": sorted(self.conflicts)}
        text = json.dumps(owned)
        if len(text) > TAG_CHARS:
            owned = {**owned, "metrics": ["…"], "params": ["…"], "refused": ["…"]}
            text = json.dumps(owned)
        self.client.set_tag(self.run_id, "ledger.owned", text)

    def _log(self, metrics: list[Any], done: int, head: bytes, tag: Any) -> int:
        """One log_batch: ``metrics`` and, when entries were completed, the cursor tags (in the same
        call, so the cursor never runs ahead of the metrics or behind them)."""
        assert self.cursor is not None
        tags = [] if done <= self.cursor else [tag("ledger.mirrored_seq", str(done)),
                                               tag("ledger.entries", str(done + 1)),
                                               tag("ledger.head", bytes(head).hex())]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        self.cursor = max(self.cursor, done)
        return len(metrics)

    def _setup(self, tag: Any) -> None:
        """Params, the public key, then the static tags (``ledger.format`` last: it says the set-up is
        complete). Idempotent on the server; a param the run already holds with another value (MLflow
        refuses to change one) is left as it is, named in a warning and in ``ledger.owned``."""
        from mlflow.entities import Param

        from ledger._reader import Ledger

        genesis = Ledger(self.layout.root).genesis()
        params = params_of(genesis.get("config", {}), genesis.get("seed"))
        self._params = set(params)
        clash = {k for k, v in params.items() if k in self._held and self._held[k] != v}
        if clash - self.conflicts:
            warnings.warn(f"MLflow run {self.run_id} already holds other values for params {sorted(clash)[:5]}: "
                          "they are not mirrored, and verify --mlflow-run will name them", RuntimeWarning,
                          stacklevel=2)
        self.conflicts |= clash
        items = [Param(k, v) for k, v in params.items() if k not in clash and k not in self._held]
        for i in range(0, len(items), MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS])
        public = genesis.get("public_key")
        if isinstance(public, bytes | bytearray):
            with tempfile.TemporaryDirectory(prefix="ledger-mlflow-") as tmp:
                target = Path(tmp) / "key.pub"
                target.write_bytes(public_key_pem(bytes(public)))
                self.client.log_artifact(self.run_id, str(target), "ledger")
        key_id = genesis.get("key_id", b"")
        self.client.log_batch(self.run_id, tags=[
            tag("ledger.run_id", str(genesis.get("run_id"))),
            tag("ledger.key_id", bytes(key_id).hex() if isinstance(key_id, bytes | bytearray) else str(key_id)),
            tag("ledger.format", str(genesis.get("format")))])
        self._set_up = True

    def _upload_parts(self) -> int:
        """Upload closed parts and the signed tree heads and their tokens (``heads/N.note``, ``N.tsr``:
        immutable once written) not uploaded yet; the number of parts uploaded."""
        assert self._uploaded is not None
        if self._heads_uploaded is None:
            self._heads_uploaded = {Path(f.path).name for f in self.client.list_artifacts(self.run_id, "ledger/heads")}
        count = 0
        for part in _parts.list_parts(self.layout.parts):
            if part.name not in self._uploaded:
                self.client.log_artifact(self.run_id, str(part), "ledger/parts")
                self._uploaded.add(part.name)
                count += 1
        # a head only once the parts uploaded hold every entry it covers: a head ahead of the published
        # parts would read as a fork to a verifier of the run while it goes on
        through = max((self._spans[name] for name in self._uploaded if name in self._spans), default=-1)
        for head in sorted(self._head_files(), key=lambda p: p.name):
            if head.name not in self._heads_uploaded and int(head.name.partition(".")[0]) <= through + 1:
                self.client.log_artifact(self.run_id, str(head), "ledger/heads")
                self._heads_uploaded.add(head.name)
        return count

    def _head_files(self) -> list[Path]:
        folder = self.layout.root / "heads"
        try:
            names = [p for p in folder.iterdir() if is_head_file(p.name) and p.is_file() and not p.is_symlink()]
        except OSError:  # no heads yet
            return []
        return names

    def _tables(self) -> Iterator[pa.Table]:
        """The entries after the cursor, part by part then the log tail (one source in memory at a time)."""
        assert self.cursor is not None
        last = -1
        for part in _parts.list_parts(self.layout.parts):
            known = self._spans.get(part.name)
            if known is not None and known <= self.cursor:
                last = known
                continue
            table = _parts.read_part(part)
            if table.num_rows:
                last = self._spans[part.name] = int(table["seq"][-1].as_py())
            if last > self.cursor:
                yield _after(table, self.cursor)
        frames = self._read_log()
        floor = max(last, self.cursor)
        rows = [i for i in range(len(frames.payloads)) if floor < _safe_seq(frames.record(i)) < 1 << 62]
        if rows:
            yield wal_table(frames, rows, None)

    def _read_log(self) -> _wal.WalFrames:
        """The log's frames from where the last pass's mirrored ones end (the log only grows by
        appends until a roll replaces the file: then from its start), without re-reading the rest."""
        self._wal_ends = []
        try:
            handle = open(self.layout.wal, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return _wal.frames(b"")
        with handle:
            info = os.fstat(handle.fileno())
            # the same file (a roll replaces it; a new one may reuse the inode, then it is shorter at first)
            same = self._wal_at[:2] == (info.st_dev, info.st_ino) and info.st_size >= self._wal_at[2]
            offset = self._wal_at[2] if same else 0
            self._wal_at = (info.st_dev, info.st_ino, offset)
            handle.seek(offset)
            data = handle.read(_wal.MAX_LOG)
        shift = 0 if offset == 0 else len(_wal.MAGIC)
        frames = _wal.frames(data if offset == 0 else _wal.MAGIC + data)
        self._wal_ends = [(_safe_seq(frames.record(i)), offset + end - shift)
                          for i, (_, end) in enumerate(frames.payloads)]
        return frames

    def _advance_log(self) -> None:
        """After a pass: the next one reads the log from the end of the last mirrored frame."""
        done = [end for seq, end in self._wal_ends if self.cursor is not None and seq <= self.cursor]
        if done:
            self._wal_at = (*self._wal_at[:2], max(done))

    # ----------------------------------------------------------------- the background thread
    def start(self) -> Mirror:
        """Mirror on a background thread until :meth:`finish` or :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="ledger-mlflow", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        delay = self.interval
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop:
                return
            final = self._final
            started = time.thread_time()
            try:
                self.push(final=final)
            except Exception as exc:  # the server is down or slow, the run refused something: retry later
                self.failures += 1
                self.error = _short(exc)
                delay = min(MAX_BACKOFF, self.interval * 2 ** min(self.failures, 8))
            else:
                self.failures, self.error, delay = 0, None, self.interval
                if final:
                    self._done = True
            finally:
                self.cpu_seconds += time.thread_time() - started
            with self._changed:
                self._changed.notify_all()
            if self._done:
                return

    def settle(self, target: int, timeout: float) -> dict[str, Any]:
        """Wait up to ``timeout`` seconds for the entries through seq ``target`` to be mirrored; what
        the seal records about the mirror."""
        deadline = time.monotonic() + max(0.0, timeout)
        self._wake.set()
        with self._changed:
            while (self.cursor is None or self.cursor < target) and self._alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.set()
                self._changed.wait(min(left, 0.5))
        through = -1 if self.cursor is None else self.cursor
        return {"mlflow_run_id": self.run_id, "mirrored_through_seq": through, "missing": through < target}

    def finish(self, timeout: float) -> bool:
        """After close: one last pass (the seal, every part, the owned keys), waited for up to
        ``timeout`` seconds; ends the run when the mirror created it. True when it completed."""
        self._final = True
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while not self._done and self._alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.set()
                self._changed.wait(min(left, 0.5))
        self.stop()
        if self._done and self.created:
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.run_id, "FINISHED")
        if not self._done:
            warnings.warn(f"the MLflow mirror of {self.layout.root} is incomplete (run {self.run_id}, mirrored through "
                          f"seq {self.cursor}; {self.error or 'timed out'}): `ledger mlflow sync {self.layout.root}` "
                          "pushes the rest", RuntimeWarning, stacklevel=3)
        return self._done

    def stop(self) -> None:
        """End the thread (a request in flight is left to finish on its own; the thread is a daemon)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _after(table: pa.Table, cursor: int) -> pa.Table:
    import pyarrow.compute as pc

    return table.filter(pc.greater(table["seq"], cursor))


def start(sink: MlflowSink, config: Mapping[str, Any], path: str | os.PathLike[str], created: bool) -> Mirror:
    """The background mirror of the ledger at ``path`` into the run ``config`` (genesis ``config["mlflow"]``) names."""
    return Mirror(path, str(config["run_id"]), sink.tracking_uri or config.get("tracking_uri"), interval=sink.interval,
                  created=created).start()


MAX_REPORT = 64 << 20  # bytes of an HTML report sync uploads


def sync(path: str | os.PathLike[str], run_id: str | None = None, tracking_uri: str | None = None,
         report: str | os.PathLike[str] | None = None) -> Progress:
    """Push what the run lacks of the ledger at ``path`` (``ledger mlflow sync``): entries after the
    run's ``ledger.mirrored_seq`` tag, parts not uploaded, the key; nothing twice. ``report``: an
    HTML verify report, uploaded as ``ledger/report.html`` (replacing an earlier one)."""
    from ledger._io import read_regular
    from ledger._reader import Ledger

    page = read_regular(report, what="report", limit=MAX_REPORT, error=ConfigurationError) \
        if report is not None else None

    config = Ledger(path).genesis().get("config", {})
    recorded = config.get("mlflow") if isinstance(config, Mapping) else None
    recorded = recorded if isinstance(recorded, Mapping) else {}
    run_id = run_id or recorded.get("run_id")
    tracking_uri = tracking_uri or recorded.get("tracking_uri")
    if not run_id:
        raise ConfigurationError(f"{path} names no MLflow run (genesis config has no 'mlflow'): give --run-id")
    mirror = Mirror(path, str(run_id), tracking_uri)
    try:
        mirror.client.get_run(str(run_id))
    except Exception as exc:
        raise ConfigurationError(f"could not reach MLflow run {run_id} at {tracking_uri}: {_short(exc)}") from None
    total = Progress(0, 0, -1)
    while True:  # a pass stops at a gap (a roll while reading): go on until nothing moves
        before = mirror.cursor
        try:
            step = mirror.push(final=True)
        except Exception as exc:
            raise ConfigurationError(f"could not mirror into MLflow run {run_id}: {_short(exc)}") from None
        total = Progress(total.metrics + step.metrics, total.parts + step.parts, step.cursor)
        if step.cursor == before:
            break
    if page is not None:
        with tempfile.TemporaryDirectory(prefix="ledger-mlflow-") as tmp:
            (Path(tmp) / "report.html").write_bytes(page)
            try:
                mirror.client.log_artifact(str(run_id), str(Path(tmp) / "report.html"), "ledger")
            except Exception as exc:
                raise ConfigurationError(f"could not upload the report to MLflow run {run_id}: {_short(exc)}") from None
    return total
