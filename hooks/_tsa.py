"""The recorder's background timestamper: each signed tree head, stamped by an RFC 3161 TSA.

``Recorder(..., tsa="https://…")`` hands every head the writer makes durable to
:meth:`Timestamper.submit`, which only queues it (training never waits on the TSA). One thread
POSTs a query per head (:func:`ledger._tsa.request`, over SHA-256 of the note text) with a
timeout, checks the answer against the query (:func:`ledger._tsa.accept`), writes the token to
``heads/<size>.tsr`` (fsynced, never rewritten) and keeps it for the recorder, which puts the tokens
that arrived into the next entry's ``timestamps`` field (docs/FORMAT.md §13, Timestamps). A query
that fails (the TSA down, an HTTP error, a bad answer) is retried with exponential backoff; at
close the recorder waits a bounded time, then records in the seal which heads are unstamped.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger import _tsa
from ledger._heads import list_heads
from ledger._layout import create_file, fsync_dir, unlink_quietly
from ledger._note import split_note
from ledger._schema import Timestamp
from ledger.errors import ConfigurationError, LedgerError

MAX_PENDING = 4096  # heads waiting for a token; a run checkpoints far less often than that


@dataclass(frozen=True, slots=True)
class TsaOptions:
    """Where and how to timestamp: the TSA's ``url`` (http or https), the ``timeout`` of one query
    in seconds, the first retry ``backoff`` and its cap ``max_backoff`` (doubling in between), and
    ``close_timeout``: how long ``close()`` waits in all for heads still unstamped (one budget for
    the wait before the seal and the one after it for the seal's own head)."""

    url: str
    timeout: float = 10.0
    backoff: float = 1.0
    max_backoff: float = 60.0
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigurationError(f"tsa must be an http or https URL of a time-stamping authority, not {self.url!r}")
        if not (self.timeout > 0 and self.backoff > 0 and self.max_backoff >= self.backoff and self.close_timeout >= 0):
            raise ConfigurationError("tsa timeout and backoff must be positive, max_backoff ≥ backoff, "
                                     "close_timeout ≥ 0")

    @property
    def public_url(self) -> str:
        """The URL as the seal records it: without user, password, query or fragment."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        return urllib.parse.urlunsplit((parts.scheme, netloc + (f":{parts.port}" if parts.port else ""),
                                        parts.path, "", ""))


def options_of(tsa: Any) -> TsaOptions | None:
    """The timestamping a ``tsa=`` option asks for: None (off), a URL, or :class:`TsaOptions`;
    checked before anything is written (the ``tsa`` extra must be installed)."""
    if tsa is None:
        return None
    if not isinstance(tsa, (str, TsaOptions)):
        raise ConfigurationError(f"tsa must be a URL or TsaOptions, not {type(tsa).__name__}")
    options = TsaOptions(tsa) if isinstance(tsa, str) else tsa
    _tsa.require()
    return options


def timestamps_field(tokens: list[tuple[int, bytes]]) -> dict[str, Any]:
    """An entry's ``timestamps`` field for ``tokens`` (size, token); empty when there are none."""
    return {"timestamps": [Timestamp(size, token).to_body() for size, token in tokens]} if tokens else {}


@dataclass
class _Head:
    size: int
    text: bytes
    attempts: int = 0
    due: float = 0.0
    error: str = ""


@dataclass
class Timestamper:
    """Stamps heads on one background thread (see the module docstring). ``heads`` is the ledger's
    ``heads/`` directory; ``failures`` counts failed queries; ``errors`` keeps the last error of
    each head still unstamped."""

    options: TsaOptions
    heads: Path
    failures: int = 0
    stamped: dict[int, _tsa.Stamp] = field(default_factory=dict)
    _pending: dict[int, _Head] = field(default_factory=dict)
    _ready: list[tuple[int, bytes]] = field(default_factory=list)
    _refused: dict[int, str] = field(default_factory=dict)  # heads whose note could not be read: never queried
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stopping: bool = False
    _hurry: bool = False
    _close_deadline: float | None = None  # set by seal_fields: finish() waits only for what is left
    _thread: threading.Thread | None = None

    def start(self) -> Timestamper:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name="ledger-tsa", daemon=True)
        self._thread.start()
        return self

    def submit(self, size: int, note: bytes) -> None:
        """Queue head ``size`` (its signed note) for a token; returns at once (the writer's
        ``on_head`` callback). A note that cannot be split into its text is left unstamped."""
        try:
            text = split_note(note)[0]
        except LedgerError as exc:  # never raised into the writer: the head stays unstamped, and says why
            with self._cond:
                self._refused[size] = f"its note could not be read: {_reason(exc)}"
            return
        with self._cond:
            if size in self._pending or size in self.stamped or self._stopping:
                return
            if len(self._pending) >= MAX_PENDING:  # the oldest waits longest: keep the newest heads
                del self._pending[min(self._pending)]
            self._pending[size] = _Head(size, text)
            self._cond.notify_all()

    def catch_up(self, ledger_dir: Path) -> None:
        """Queue the heads already in ``heads/`` without a token (a resumed run: stamped late, they
        still bound those entries). A ``heads/`` that cannot be read is left to verify."""
        try:
            heads = list_heads(ledger_dir)
        except (LedgerError, OSError):
            return
        for size, note in heads:
            if not (self.heads / f"{size}.tsr").exists():
                self.submit(size, note)

    def take(self) -> list[tuple[int, bytes]]:
        """The tokens (size, DER response) that arrived since the last call, for the next entry."""
        with self._cond:
            ready, self._ready = self._ready, []
        return ready

    def give_back(self, tokens: list[tuple[int, bytes]]) -> None:
        """Tokens taken for an entry that could not be appended: the next entry carries them."""
        with self._cond:
            self._ready[:0] = tokens

    def unstamped(self) -> dict[int, str]:
        """Heads still without a token, with the last error of each ("" when not tried yet)."""
        with self._cond:
            left = {size: head.error for size, head in self._pending.items()} | self._refused
        return dict(sorted(left.items()))

    def settle(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for every queued head to be stamped, retrying without
        the long backoff meanwhile; True when none is left."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            self._hurry = True
            now = time.monotonic()
            for head in self._pending.values():
                head.due = min(head.due, now)
            self._cond.notify_all()
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return not self._pending

    def stop(self, timeout: float = 0.0) -> dict[int, str]:
        """Wait at most ``timeout`` seconds for what is queued, stop the thread (a query under way
        is abandoned: the thread is a daemon) and return the heads left unstamped."""
        self.settle(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        return self.unstamped()

    def seal_fields(self) -> dict[str, Any]:
        """The seal's fields, after waiting at most ``close_timeout`` for the heads queued: the
        tokens not yet in an entry (``timestamps``) and ``tsa``: the TSA asked and the heads still
        unstamped (docs/FORMAT.md §13)."""
        self._close_deadline = time.monotonic() + self.options.close_timeout
        self.settle(self.options.close_timeout)
        status = {"url": self.options.public_url, "unstamped": list(self.unstamped())}
        return {"tsa": status, **timestamps_field(self.take())}

    def finish(self, where: str) -> None:
        """After the seal: wait for the final head's token (it goes to ``heads/`` only) for what is
        left of ``close_timeout`` since :meth:`seal_fields` (all of it without one), stop, and warn
        naming the heads of ledger ``where`` left without a token."""
        budget = self.options.close_timeout if self._close_deadline is None else \
            self._close_deadline - time.monotonic()
        left = self.stop(max(budget, 0.0))
        if left:
            errors = [why for why in left.values() if why]
            sizes = ", ".join(map(str, list(left)[:10]))
            why = errors[-1] if errors else f"no answer within close_timeout ({self.options.close_timeout:g} s)"
            warnings.warn(f"{len(left)} tree head(s) of {where} have no timestamp (sizes {sizes}; last error: {why}); "
                          "ledger verify --tsa-roots lists them", RuntimeWarning, stacklevel=3)

    # ----------------------------------------------------------------- the thread
    def _next(self) -> _Head | None:
        """The next head due (waiting until one is), or None once stopping."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                due = min(self._pending.values(), key=lambda h: (h.due, h.size), default=None)
                if due is not None and due.due <= now:
                    return due
                self._cond.wait(None if due is None else due.due - now)
            return None

    def _run(self) -> None:
        while (head := self._next()) is not None:
            try:
                token = self._stamp(head)
            except Exception as exc:  # noqa: BLE001 - any failed query is retried; the thread never dies
                with self._cond:
                    self.failures += 1
                    head.attempts += 1
                    head.error = _reason(exc)
                    delay = min(self.options.max_backoff, self.options.backoff * 2 ** (head.attempts - 1))
                    head.due = time.monotonic() + (min(delay, 0.5) if self._hurry else delay * random.uniform(0.8, 1.2))
                continue
            with self._cond:
                self._pending.pop(head.size, None)
                self._ready.append((head.size, token))
                self._cond.notify_all()

    def _stamp(self, head: _Head) -> bytes:
        """One query for ``head``: POST, check the answer, write ``heads/<size>.tsr``; the token."""
        query = _tsa.request(head.text)
        answer = _post(self.options.url, query.der, self.options.timeout)
        stamp = _tsa.accept(answer, query)
        _write_token(self.heads / f"{head.size}.tsr", answer)
        with self._cond:
            self.stamped[head.size] = stamp
        return answer


def _post(url: str, query: bytes, timeout: float) -> bytes:
    """POST a DER query as ``application/timestamp-query``; the answer's bytes (at most
    :data:`ledger._tsa.MAX_TOKEN`). A ``user:password@`` in the URL is sent as HTTP Basic
    authorization, never as part of the URL. OSError or LedgerError when there is no good answer."""
    target, headers = _with_credentials(url)
    request = urllib.request.Request(target, data=query, method="POST",
                                     headers={"Content-Type": _tsa.QUERY_TYPE, "Accept": _tsa.REPLY_TYPE, **headers})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            answer: bytes = response.read(_tsa.MAX_TOKEN + 1)
    except urllib.error.HTTPError as exc:
        raise ConfigurationError(f"the TSA answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ConfigurationError(f"the TSA could not be reached ({exc.reason})") from None
    if len(answer) > _tsa.MAX_TOKEN:
        raise ConfigurationError(f"the TSA's answer is more than {_tsa.MAX_TOKEN} bytes")
    return answer


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """RFC 3161 over HTTP needs no redirect, and following one would hand the query (and a Basic
    ``Authorization`` header) to whatever origin the answer names: refused."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl[:200]} refused", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirects)


def _with_credentials(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its user information, and the Basic ``Authorization`` header it stated."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, {}
    netloc = parts.netloc.rpartition("@")[2]
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), {"Authorization": f"Basic {token}"}


def _write_token(path: Path, token: bytes) -> None:
    """Write a token durably beside its note (a temporary file, fsync, rename, fsync the
    directory); one already there is kept (a head's token is never rewritten)."""
    if path.exists():
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    unlink_quietly(temporary)
    try:
        create_file(temporary, token)
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)  # never replaces a token already there
    finally:
        unlink_quietly(temporary)
    fsync_dir(path.parent)


def _reason(exc: BaseException) -> str:
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


__all__ = ["Timestamper", "TsaOptions", "options_of", "timestamps_field"]
