"""``mlflow``: the MLflow run a ledger was mirrored to holds exactly the ledger's values for the keys
the ledger owns (docs/VERIFYING.md, "Verifying from MLflow").

:func:`download_ledger` fetches the run's ``ledger/`` artifacts (the published ledger) into a
directory; :func:`check_mlflow` compares the run's metrics, params and tags with the ledger.
``mlflow`` is imported here only, inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger._encoding import decode_body
from ledger._mirror import OWNED_TAGS, accepts_name, as_stored, is_head_file, params_of
from ledger._parts import PART_DIGITS
from ledger._record import HEADER_SIZE, Kind, decode_header
from ledger.errors import ConfigurationError, FormatError
from ledger.verify._context import Context
from ledger.verify._load import first_break
from ledger.verify._result import CheckResult, Status

PAGE = 25_000  # metric history points per request
MAX_POINTS = 2_000_000  # points read in all (owned keys): beyond it the check fails, reading stops
EXTRA_PER_KEY = 10_000  # points beyond the ledger's own for one key before reading of that key stops
SHOWN = 20  # differences listed in the detail (all counted; the first 1000 in the JSON data)
KEPT = 1000


@dataclass(frozen=True, slots=True)
class MlflowSource:
    """Which MLflow run to compare with: its id and the tracking URI (None: MLflow's configured one)."""

    run_id: str
    tracking_uri: str | None = None
    live: bool = False  # the run is still going: an unsealed published ledger warns instead of failing


@contextlib.contextmanager
def _quick_failures() -> Iterator[None]:
    """An unreachable server fails in seconds, not after MLflow's default minutes of retries, and no
    progress bar reaches stderr (unless the user set these MLflow variables themselves)."""
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _client(source: MlflowSource) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=source.tracking_uri)


def _where(source: MlflowSource) -> str:
    return f"MLflow run {source.run_id}" + (f" at {source.tracking_uri}" if source.tracking_uri else "")


def _cannot(source: MlflowSource, exc: BaseException) -> ConfigurationError:
    text = " ".join(str(exc).split())
    return ConfigurationError(f"cannot read {_where(source)}: {type(exc).__name__}: {text[:300]}")


MAX_DOWNLOAD = 8 << 30  # bytes of ledger artifacts downloaded in all (the listed sizes)
MAX_FILES = 4096 + 16 + 20_000  # parts (ledger._parts.MAX_PARTS), the key, signed heads and their tokens


def _wanted(path: str) -> bool:
    """The artifacts that make up a published ledger: ``ledger/key.pub``, ``ledger/parts/NNNNNN.parquet``
    and ``ledger/heads/<size>.note|.tsr`` (anything else under ``ledger/``, a report or a file someone
    added, is not downloaded)."""
    if path == "ledger/key.pub":
        return True
    folder, _, name = path.rpartition("/")
    if folder == "ledger/heads":
        return is_head_file(name)
    stem = name.removesuffix(".parquet")
    return folder == "ledger/parts" and name.endswith(".parquet") and len(stem) == PART_DIGITS and stem.isdigit() \
        and stem.isascii()


def _listing(client: Any, source: MlflowSource) -> list[tuple[str, int]]:
    """The wanted artifacts and their listed sizes, checked against the caps before anything is fetched."""
    found: list[tuple[str, int]] = []
    for folder in ("ledger", "ledger/parts", "ledger/heads"):
        for item in client.list_artifacts(source.run_id, folder):
            if not item.is_dir and _wanted(item.path):
                found.append((item.path, int(item.file_size or 0)))
            if len(found) > MAX_FILES:
                raise ConfigurationError(f"{_where(source)} lists more than {MAX_FILES} ledger artifacts")
    total = sum(size for _, size in found)
    if total > MAX_DOWNLOAD:
        raise ConfigurationError(f"{_where(source)}'s ledger artifacts are {total} bytes, more than the "
                                 f"{MAX_DOWNLOAD >> 30} GiB verify downloads")
    return found


def _local_store(uri: str | None) -> Path | None:
    """The database file or directory a local tracking URI names (``sqlite:///…``, ``file:…``, a path)."""
    if not uri or uri.startswith("databricks") or "://" in uri and not uri.startswith(("sqlite:", "file:")):
        return None
    if uri.startswith("sqlite:"):
        return Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs → /abs, sqlite:///rel → rel
    return Path(uri.removeprefix("file://").removeprefix("file:"))


def download_ledger(source: MlflowSource, dest: Path) -> Path:
    """Download the run's published ledger (``ledger/key.pub`` and ``ledger/parts/*``, within
    :data:`MAX_DOWNLOAD` bytes as listed) into ``dest`` and return the ledger directory. Raises
    :class:`~ledger.ConfigurationError` (exit 2) when the server cannot be reached, the run does
    not exist, or it holds no ledger parts."""
    store = _local_store(source.tracking_uri)
    if store is not None and not store.exists():  # MLflow would create it: verify writes nothing there
        raise ConfigurationError(f"the tracking store {source.tracking_uri} does not exist")
    with _quick_failures():
        try:
            client = _client(source)
            client.get_run(source.run_id)
            listed = _listing(client, source)
            if not any(path.startswith("ledger/parts/") for path, _ in listed):
                raise ConfigurationError(f"{_where(source)} holds no ledger artifacts (no ledger/parts/*.parquet)")
            for folder in ("parts", "heads"):
                (dest / "ledger" / folder).mkdir(parents=True, exist_ok=True)
            for path, _ in listed:
                client.download_artifacts(source.run_id, path, dst_path=str(dest / path.rpartition("/")[0]))
        except ConfigurationError:
            raise
        except Exception as exc:  # noqa: BLE001 - MLflow's, requests' and the artifact repository's own errors
            raise _cannot(source, exc) from exc
    return dest / "ledger"


# --- the ledger's side -------------------------------------------------------------------------------


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@dataclass
class _LedgerSide:
    metrics: dict[str, dict[int, float]]  # key -> step -> value (live entries)
    seqs: dict[str, dict[int, int]]  # key -> step -> seq of the live entry holding it
    ms: dict[str, dict[int, int]]  # key -> step -> that entry's time in ms (MLflow's metric timestamp)
    superseded: dict[str, dict[int, list[float]]]  # key -> step -> values of superseded entries
    params: dict[str, str]
    seal_mirror: Any  # the seal's ``mirror`` field (what the ledger itself recorded as not mirrored)
    refused: set[str]  # metric names MLflow does not accept (never mirrored, expected absent)
    last_step: int
    sealed: bool


def _ledger_side(ctx: Context) -> _LedgerSide:
    view = ctx.view
    assert view is not None
    superseded_seqs = {seq for seq, _ in view.superseded}
    metrics: dict[str, dict[int, float]] = {}
    seqs: dict[str, dict[int, int]] = {}
    ms: dict[str, dict[int, int]] = {}
    superseded: dict[str, dict[int, list[float]]] = {}
    seal_mirror: Any = None
    last_step = -1
    sealed = False
    refused: set[str] = set()
    records = ctx.loaded.records
    for index in range(first_break(ctx.loaded)):
        record = records[index]
        try:
            header = decode_header(record)
            if header.kind not in (Kind.STEP, Kind.SEAL):
                continue
            body = decode_body(record[HEADER_SIZE:])
        except FormatError:
            continue  # chain and the provenance checks name damaged entries
        if header.kind is Kind.SEAL:
            seal_mirror = body.get("mirror") if isinstance(body, dict) else None
            sealed = True
            continue
        values = body.get("metrics") if isinstance(body, dict) else None
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if not isinstance(key, str) or not isinstance(value, (int, float)):
                continue
            if not accepts_name(key):
                refused.add(key)
                continue
            stored = as_stored(float(value))
            if header.seq in superseded_seqs:
                superseded.setdefault(key, {}).setdefault(header.step, []).append(stored)
            else:
                metrics.setdefault(key, {})[header.step] = stored
                seqs.setdefault(key, {})[header.step] = header.seq
                ms.setdefault(key, {})[header.step] = header.time_ns // 1_000_000
                last_step = max(last_step, header.step)
    genesis = view.genesis
    params = params_of(genesis.config, genesis.seed)
    return _LedgerSide(metrics, seqs, ms, superseded, params, seal_mirror, refused, last_step, sealed)


def recorded_gap(seal_mirror: Any) -> int | None:
    """The seq after which the ledger itself recorded that entries were not mirrored (seal ``mirror``
    {``missing``: true, ``mirrored_through_seq``: N} gives N), or None when it recorded no gap."""
    if not isinstance(seal_mirror, Mapping) or seal_mirror.get("missing") is not True:
        return None
    through = seal_mirror.get("mirrored_through_seq")
    return through if isinstance(through, int) and not isinstance(through, bool) else -1


# --- the comparison ----------------------------------------------------------------------------------


@dataclass
class _Findings:
    """What the comparison found. MLflow decides how many values differ: only the first KEPT are kept
    (all are counted), so a hostile run cannot grow this past a bound."""

    side: _LedgerSide
    differs: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)  # at most the ledger's own values
    differs_count: int = 0
    ahead: int = 0  # metric values past the last step of a published ledger that is not sealed
    compared: int = 0
    metric_points: int = 0
    superseded: int = 0
    duplicates: int = 0  # the ledger's value logged again at its step (nothing MLflow shows changes)
    capped: str = ""

    def differ(self, kind: str, key: str, step: int | None, mlflow: Any, ledger: Any) -> None:
        if kind == "metric" and ledger is None and step is not None and not self.side.sealed \
                and step > self.side.last_step:
            self.ahead += 1
            return
        self.differs_count += 1
        if len(self.differs) < KEPT:
            self.differs.append({"kind": kind, "key": key, "step": step, "mlflow": _plain(mlflow),
                                 "ledger": _plain(ledger)})

    def lack(self, kind: str, key: str, step: int | None, ledger: Any, seq: int | None = None) -> None:
        self.missing.append({"kind": kind, "key": key, "step": step, "ledger": _plain(ledger), "seq": seq})


def _plain(value: Any) -> Any:
    """NaN and ±inf as text, so the JSON report stays strict JSON."""
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else value


class _Hostile(Exception):
    """The server's paging cannot end (an empty page that asks for more, a token seen before)."""


def _history_pages(store: Any, run_id: str, key: str, pages: int) -> Iterator[list[Any]]:
    """The metric history of ``key``, page by page, at most ``pages`` requests."""
    token, seen = None, set()
    for _ in range(pages):
        page = store.get_metric_history(run_id=run_id, metric_key=key, max_results=PAGE, page_token=token)
        points = list(page)
        yield points
        token = getattr(page, "token", None)
        if not token:
            return
        if not points or token in seen:
            raise _Hostile(f"the server's history of metric {key!r} asks for more pages without giving values")
        seen.add(token)
    raise _Hostile(f"the server's history of metric {key!r} runs past {pages} pages")


def _read_history(store: Any, run_id: str, key: str, limit: int) -> dict[int, list[tuple[float, int]]]:
    """(value, timestamp ms) of the run's points for ``key``, by step; at most ``limit`` + one page read."""
    by_step: dict[int, list[tuple[float, int]]] = {}
    points = 0
    for page in _history_pages(store, run_id, key, limit // PAGE + 2):
        for metric in page:
            by_step.setdefault(int(metric.step), []).append((float(metric.value), int(metric.timestamp)))
        points += len(page)
        if points > limit:
            raise _Hostile(f"stopped reading metric {key!r} after {points} values (at most {limit} are read for it)")
    return by_step


def _compare_metrics(store: Any, run_id: str, side: _LedgerSide, found: _Findings,
                     shown: Mapping[str, float]) -> None:
    """Each owned key's history against the ledger: the live value at its step and time once, superseded
    values once each, the ledger's value again only as a duplicate; anything else differs. The value
    MLflow shows as latest must be the one this history gives."""
    budget = MAX_POINTS
    for key in sorted(side.metrics.keys() | side.superseded.keys()):
        live = side.metrics.get(key, {})
        old = side.superseded.get(key, {})
        limit = min(len(live) + sum(len(v) for v in old.values()) + EXTRA_PER_KEY, budget)
        try:
            by_step = _read_history(store, run_id, key, limit)
        except _Hostile as exc:
            found.capped = f"{exc} (the ledger holds {len(live)}; {MAX_POINTS} are read in all)"
            found.differ("metric", key, None, "a history verify cannot read to its end", len(live))
            return
        points = sum(len(v) for v in by_step.values())
        budget -= points
        found.metric_points += points
        for step in sorted(by_step.keys() | live.keys()):
            _compare_step(key, step, by_step.get(step, []), live.get(step), side.ms.get(key, {}).get(step),
                          list(old.get(step, ())), side.seqs.get(key, {}).get(step), found)
        latest = max(((s, t, v) for s, pts in by_step.items() for v, t in pts),
                     key=lambda p: (p[0], p[1], -math.inf if math.isnan(p[2]) else p[2]), default=None)
        if latest is not None and key in shown and not _same(float(shown[key]), latest[2]):
            found.differ("metric (latest shown)", key, latest[0], float(shown[key]), latest[2])


def _compare_step(key: str, step: int, points: list[tuple[float, int]], expected: float | None, ms: int | None,
                  old: list[float], seq: int | None, found: _Findings) -> None:
    exact = next((i for i, (v, t) in enumerate(points) if expected is not None and _same(v, expected) and t == ms),
                 None)
    if exact is not None:
        found.compared += 1
        points = points[:exact] + points[exact + 1:]
    moved = None  # the ledger's value at another time, when no point has its time
    for value, stamp in points:
        twin = next((i for i, v in enumerate(old) if _same(v, value)), None)
        if twin is not None:  # each superseded value once
            del old[twin]
            found.superseded += 1
        elif expected is not None and _same(value, expected):
            if exact is not None:
                found.duplicates += 1
            elif moved is None:
                moved = stamp
            else:
                found.duplicates += 1
        else:
            found.differ("metric", key, step, value, expected)
    if moved is not None:
        found.differ("metric (time)", key, step, f"{expected!r} at {moved} ms", f"{expected!r} at {ms} ms")
    elif exact is None and expected is not None:
        found.lack("metric", key, step, expected, seq)


def _compare_params(params: Mapping[str, str], side: _LedgerSide, found: _Findings) -> None:
    _compare_exact("param", side.params, params, found)


def _compare_exact(kind: str, expected: Mapping[str, str], actual: Mapping[str, str], found: _Findings) -> None:
    """Each expected value against the run's: lacking, differing, or one more value compared."""
    for key, want in sorted(expected.items()):
        value = actual.get(key)
        if value is None:
            found.lack(kind, key, None, want)
        elif value != want:
            found.differ(kind, key, None, value, want)
        else:
            found.compared += 1


def _compare_tags(ctx: Context, tags: Mapping[str, str], found: _Findings, notes: list[str], sealed: bool) -> None:
    genesis = ctx.view.genesis if ctx.view is not None else None
    assert genesis is not None
    _compare_exact("tag", {"ledger.run_id": genesis.run_id, "ledger.key_id": genesis.key_id.hex(),
                           "ledger.format": str(genesis.format)}, tags, found)
    hashes = ctx.loaded.hashes
    head, entries = tags.get("ledger.head"), tags.get("ledger.entries")
    if head is None:
        found.lack("tag", "ledger.head", None, hashes[-1].hex() if hashes else None)
    else:
        index = next((i for i in range(len(hashes) - 1, -1, -1) if hashes[i].hex() == head), None)
        if index is None and not sealed:
            notes.append(f"MLflow's ledger.head {head[:16]}… is not an entry of the published ledger, which is not "
                         "sealed (the run may still be going: its log is uploaded at close)")
        elif index is None:
            found.differ("tag", "ledger.head", None, head, "the hash of one of the ledger's entries")
        else:
            found.compared += 1
            if entries is not None and entries != str(index + 1):
                found.differ("tag", "ledger.entries", None, entries, str(index + 1))
            elif entries is not None:
                found.compared += 1
            if index != len(hashes) - 1:
                notes.append(f"MLflow's ledger.head names entry seq {index}, not the ledger's last (seq "
                             f"{len(hashes) - 1}): the mirror's last tag update lags the ledger")
    if entries is None:
        found.lack("tag", "ledger.entries", None, str(len(hashes)))
    cursor = tags.get("ledger.mirrored_seq")
    if cursor is not None:
        if len(cursor) > 20 or not cursor.lstrip("-").isdigit() or int(cursor) < -1:
            found.differ("tag", "ledger.mirrored_seq", None, cursor[:40], "a seq of the ledger")
        elif int(cursor) >= len(hashes):
            if sealed:
                found.differ("tag", "ledger.mirrored_seq", None, cursor, f"a seq of the ledger (< {len(hashes)})")
            else:
                notes.append(f"MLflow's ledger.mirrored_seq {cursor} is past the published ledger (not sealed)")
        else:
            found.compared += 1
    owned = tags.get("ledger.owned")
    if owned is not None:
        try:
            json.loads(owned)
        except ValueError:
            found.differ("tag", "ledger.owned", None, owned[:80], "a JSON object")


def _fmt(value: Any) -> str:
    return "absent" if value is None else repr(value)


def _line(item: Mapping[str, Any], missing: bool = False) -> str:
    where = f"{item['kind']} {item['key']}" + (f" step {item['step']}" if item["step"] is not None else "")
    if missing:
        return f"{where}: absent from MLflow, ledger {_fmt(item['ledger'])}"
    return f"{where}: MLflow {_fmt(item['mlflow'])}, ledger {_fmt(item['ledger'])}"


def check_mlflow(ctx: Context) -> CheckResult:
    """Compare the MLflow run ``ctx.mlflow`` with the ledger for the keys the ledger owns: its step
    entries' metric names, the params derived from genesis config and seed, the ``ledger.*`` tags."""
    from mlflow.exceptions import MlflowException

    source: MlflowSource = ctx.mlflow
    side = _ledger_side(ctx)
    found = _Findings(side)
    notes: list[str] = []
    with _quick_failures():
        try:
            client = _client(source)
            run = client.get_run(source.run_id)
            params, tags, latest = dict(run.data.params), dict(run.data.tags), dict(run.data.metrics)
            store = client._tracking_client.store  # paged metric history (MlflowClient reads every page at once)
            _compare_metrics(store, source.run_id, side, found, latest)
        except (MlflowException, OSError) as exc:
            raise _cannot(source, exc) from exc
    _compare_params(params, side, found)
    _compare_tags(ctx, tags, found, notes, side.sealed)
    config = ctx.view.genesis.config if ctx.view is not None else None
    recorded_for = config.get("mlflow") if isinstance(config, Mapping) else None
    if isinstance(recorded_for, Mapping) and recorded_for.get("run_id") not in (None, source.run_id):
        found.differ("run", "mlflow.run_id", None, source.run_id, recorded_for.get("run_id"))
    owned_metrics = side.metrics.keys() | side.superseded.keys()
    uncovered = {
        "metrics": sorted(k for k in latest if k not in owned_metrics),
        "params": sorted(k for k in params if k not in side.params),
        "tags": sorted(k for k in tags if not k.startswith("ledger.") and not k.startswith("mlflow.")),
    }
    unknown_ledger_tags = sorted(k for k in tags if k.startswith("ledger.") and k not in _KNOWN_TAGS)
    gap = recorded_gap(side.seal_mirror)
    if isinstance(side.seal_mirror, Mapping) and side.seal_mirror.get("mlflow_run_id") not in (None, source.run_id):
        found.differ("run", "seal mirror.mlflow_run_id", None, source.run_id, side.seal_mirror.get("mlflow_run_id"))
    # a value the ledger itself recorded as not mirrored (after the seal's mirrored_through_seq) only warns;
    # params and tags only when nothing was mirrored (they are set up before the first metric)
    def recorded_as_missing(item: Mapping[str, Any]) -> bool:
        return gap is not None and (gap == -1 if item["seq"] is None else item["seq"] > gap)

    excused = [m for m in found.missing if recorded_as_missing(m)]
    unexcused = [m for m in found.missing if not recorded_as_missing(m)]
    found.missing = unexcused + excused
    if found.duplicates:
        notes.append(f"{found.duplicates} ledger value(s) logged again at their step (the same value at another "
                     "time: your own mlflow.log_metric of a key the ledger owns?)")
    # the published ledger of a run still going (no seal: its last entries are uploaded at close) ends
    # before MLflow's values do: metrics past its last step only warn, as the seal check does
    if found.ahead:
        notes.append(f"{found.ahead} MLflow value(s) after the published ledger's last step {side.last_step} (the "
                     "ledger is not sealed: the run may still be going; verify again after close)")
    data: dict[str, Any] = {
        "run_id": source.run_id, "compared": found.compared, "metric_points": found.metric_points,
        "superseded": found.superseded, "differs": found.differs, "differs_count": found.differs_count,
        "ahead_of_ledger": found.ahead, "duplicates": found.duplicates,
        "missing": found.missing[:KEPT], "missing_count": len(found.missing), "sealed": side.sealed,
        "not_covered": {k: v[:KEPT] for k, v in uncovered.items()}, "unknown_ledger_tags": unknown_ledger_tags[:KEPT],
    }
    if side.seal_mirror is not None:
        data["seal_mirror"] = side.seal_mirror if isinstance(side.seal_mirror, (dict, list, str, int)) else str(
            side.seal_mirror)
    if found.capped:
        data["capped"] = found.capped
    covered = f"{found.compared} values compared ({found.metric_points} metric points read"
    covered += f", {found.superseded} superseded by a resume)" if found.superseded else ")"
    extra = sum(len(v) for v in uncovered.values())
    tail = f"; {extra} keys not covered (not the ledger's)" if extra else ""
    if side.refused:
        names = sorted(side.refused)
        data["refused_names"] = names[:KEPT]
        tail += (f"; {len(names)} metric name(s) MLflow does not accept, so not mirrored: "
                 f"{', '.join(repr(n) for n in names[:5])}" + (" …" if len(names) > 5 else ""))
    if not side.sealed and not source.live:
        detail = (f"the ledger {_where(source)} published is not sealed: a run still going (verify with --live), "
                  "or one whose published ledger was cut short, which hides what follows the cut"
                  f" ({covered}{tail})")
        return CheckResult("mlflow", Status.FAIL, detail, data, summary="published ledger not sealed")
    if found.differs_count or unexcused:
        lines = [_line(d) for d in found.differs[:SHOWN]]
        lines += [_line(m, missing=True) for m in unexcused[:max(SHOWN - len(lines), 0)]]
        more = found.differs_count + len(unexcused) - len(lines)
        detail = (f"{found.differs_count} MLflow value(s) not in the ledger or different"
                  + (f", {len(unexcused)} ledger value(s) absent from MLflow" if unexcused else "")
                  + f": {'; '.join(lines)}" + (f"; … {more} more" if more > 0 else "") + f" ({covered}{tail})")
        return CheckResult("mlflow", Status.FAIL, detail, data, summary="MLflow differs from the ledger")
    if excused:
        detail = (f"{len(excused)} ledger value(s) absent from MLflow, a gap the ledger recorded in its seal (after "
                  f"seq {gap}; ledger mlflow sync fills it): {'; '.join(_line(m, True) for m in excused[:5])}; "
                  f"{covered}{tail}")
        return CheckResult("mlflow", Status.WARN, detail, data, summary="mirror gap recorded by the ledger")
    if notes or unknown_ledger_tags:
        warn = notes + ([f"ledger.* tags the ledger does not define: {', '.join(unknown_ledger_tags[:SHOWN])}"]
                        if unknown_ledger_tags else [])
        return CheckResult("mlflow", Status.WARN, f"{'; '.join(warn)} ({covered}{tail})", data)
    if gap is not None:
        tail += f"; the ledger recorded a mirror gap after seq {gap}, since filled"
    return CheckResult("mlflow", Status.PASS, f"MLflow run {source.run_id} matches the ledger: {covered}{tail}", data)


_KNOWN_TAGS = frozenset(OWNED_TAGS)
