"""The recorder's background writer: a bounded queue drained in batches on one thread."""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from typing import Any


class WriterQueue:
    """Jobs run in order on one background thread, which wakes every ``interval`` seconds or when
    ``bound`` jobs wait, not at every put: waking a thread per step would cost the training thread
    a GIL hand-off each step. ``put`` blocks while ``bound`` jobs wait (the queue is bounded)."""

    def __init__(self, run: Callable[[Any], None], bound: int, interval: float) -> None:
        self._run, self._bound, self._interval = run, max(1, bound), interval
        self._jobs: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._changed = threading.Condition()
        self._queued = self._done = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ledger-writer", daemon=True)
        self._thread.start()

    def put(self, job: Any) -> None:
        """Queue a job (from the training thread)."""
        self._jobs.append(job)
        self._queued += 1
        if len(self._jobs) >= self._bound:
            self._wake.set()
            with self._changed:
                self._changed.wait_for(lambda: len(self._jobs) < self._bound)

    def join(self) -> None:
        """Return once every job queued so far has run."""
        target = self._queued
        self._wake.set()
        with self._changed:
            self._changed.wait_for(lambda: self._done >= target)

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        self.join()
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        _lower_priority()
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            while self._jobs:
                self._run(self._jobs.popleft())
                with self._changed:
                    self._done += 1
                    self._changed.notify_all()
            if self._stopping:
                return


def _lower_priority() -> None:
    """Run this thread at the lowest CPU priority (Linux: per-thread nice 19), so that when training
    keeps every core busy the writer takes idle time instead of stalling torch's worker threads."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass
