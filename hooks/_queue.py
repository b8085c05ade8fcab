"""The recorder's background writer: a queue bounded in entries and in time, drained in batches on
one thread."""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ledger.errors import ConfigurationError

STOPPED = "the recorder's writer thread has stopped (the recorder was closed or aborted); nothing more is written"


class WriterQueue:
    """Jobs run in order on one background thread, which wakes every ``interval`` seconds or when a
    bound is reached, not at every put: waking a thread per step would cost the training thread a
    GIL hand-off each step.

    Two bounds hold what may wait unwritten: ``bound`` jobs, and ``max_lag`` seconds — ``put``
    returns only once fewer than ``bound`` jobs wait and every job queued more than ``max_lag``
    seconds ago has run (the one running counts as waiting). So at any moment, the jobs not yet run
    were all queued within ``max_lag`` seconds of the latest ``put`` and are at most ``bound``.
    In the normal case (the thread drains every ``interval`` ≪ ``max_lag``) ``put`` never waits."""

    def __init__(self, run: Callable[[Any], None], bound: int, interval: float, max_lag: float = 1.0) -> None:
        self._run, self._bound, self._interval = run, max(1, bound), interval
        self._max_lag = max_lag
        self._jobs: collections.deque[tuple[float, Any]] = collections.deque()  # (time queued, job)
        self._running_since: float | None = None  # when the job now running was queued
        self._wake = threading.Event()
        self._changed = threading.Condition()
        self._queued = self._done = 0
        self._stopping = False
        self.waits = 0  # how many puts had to wait for a bound (for benchmarks and tests)
        self._alive = True  # until _loop ends (cheaper to read at every put than Thread.is_alive)
        self._pid = os.getpid()  # a forked child has the queue but not the thread
        self._thread = threading.Thread(target=self._loop, name="ledger-writer", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called or the thread is gone: nothing queued would run."""
        return self._stopping or not self._alive or os.getpid() != self._pid

    def put(self, job: Any, *, wake: bool = False) -> None:
        """Queue a job (from the training thread); wait while a bound is reached. ``wake``: start
        a round now (a job that holds much memory until it runs: a checkpoint's snapshot). Raises
        :class:`ConfigurationError` once the thread is stopped (instead of waiting forever)."""
        if self.stopped:
            raise ConfigurationError(STOPPED)
        now = time.monotonic()
        self._jobs.append((now, job))
        self._queued += 1
        if wake:
            self._wake.set()
        if len(self._jobs) >= self._bound or now - self._oldest(now) >= self._max_lag:
            self.waits += 1
            self._wake.set()
            self._wait(self._within_bounds)

    def _wait(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition`` holds; raise if the thread dies first."""
        with self._changed:
            while not self._changed.wait_for(condition, timeout=0.2):
                if not self._thread.is_alive():
                    raise ConfigurationError(STOPPED)

    def _oldest(self, now: float) -> float:
        """When the oldest job not yet run was queued (``now`` when none waits)."""
        running = self._running_since
        try:
            first = self._jobs[0][0]
        except IndexError:  # the writer thread emptied the queue meanwhile
            first = now
        return first if running is None else min(running, first)

    def _within_bounds(self) -> bool:
        now = time.monotonic()
        return len(self._jobs) < self._bound and now - self._oldest(now) < self._max_lag

    def join(self) -> None:
        """Return once every job queued so far has run (raises once the thread is stopped)."""
        if self.stopped:
            raise ConfigurationError(STOPPED)
        target = self._queued
        self._wake.set()
        self._wait(lambda: self._done >= target)

    def stop(self) -> None:
        """Run what is queued, then end the thread (idempotent)."""
        if self.stopped:
            self._stopping = True
            return
        self.join()
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            self._drain()
        finally:
            self._alive = False

    def _drain(self) -> None:
        # Normal priority on purpose: the training thread waits for this one when a bound is
        # reached, so a lowered priority (it ran at nice 19 before) would turn CPU contention into
        # a training stall and let the unwritten tail grow.
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            while self._jobs:
                queued, job = self._jobs[0]
                self._running_since = queued
                self._jobs.popleft()
                try:
                    self._run(job)
                finally:
                    with self._changed:
                        self._running_since = None
                        self._done += 1
                        self._changed.notify_all()
            if self._stopping:
                return
