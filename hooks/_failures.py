"""What goes wrong on the recorder's writer thread, kept for the training thread: a failure the
writer survived, the checkpoints whose files could not be written, and an append the disk refused
(the writer is then broken), with the acknowledged steps whose entries were not written."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from ledger._writer import LedgerWriter
from ledger.errors import LedgerError, StorageError
from ledger.hooks._checkpointing import CheckpointFailed, Checkpoints, reason
from ledger.hooks._queue import WriterQueue


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """A job for the writer thread: ``step`` is the step a step entry records (None for a checkpoint)."""

    run: Callable[[], Any]
    step: int | None = None


class Failures:
    """The background failures of one recorder. ``lock`` guards what the writer thread sets and the
    training thread takes: the failure not raised yet and ``checkpoints``' failed ones."""

    def __init__(self, writer: LedgerWriter, checkpoints: Checkpoints, lock: threading.Lock) -> None:
        self.broken: BaseException | None = None  # the append failure that stopped the writer
        self.lost: list[int] = []  # acknowledged steps whose entry was not written
        self._failure: BaseException | None = None  # a background failure not raised yet
        self._writer, self._checkpoints, self._lock = writer, checkpoints, lock

    def run(self, job: Job) -> None:
        """Run one job on the writer thread. Once an append has failed on the disk (the writer is
        broken) later jobs are not run and the steps they carry are counted as lost; any other
        failure is kept for the training thread, and later entries are still appended."""
        if self.broken is not None:
            if job.step is not None:
                self.lost.append(job.step)
            return
        try:
            job.run()
        except BaseException as exc:  # surfaced on the training thread at the next call
            if job.step is not None:
                self.lost.append(job.step)
            if isinstance(exc, (StorageError, OSError)) or self._writer.closed:
                self.broken = exc
            else:
                with self._lock:
                    self._failure = self._failure or exc

    def raise_pending(self, queue: WriterQueue) -> None:
        """Raise a background failure on the training thread: once for a failure the writer
        survived, at every call once the writer is broken (after ``queue`` has run what it holds)."""
        if self.broken is not None:
            if not queue.stopped:
                queue.join()  # every queued step is counted
            raise StorageError(f"the ledger's writer failed ({reason(self.broken)}); {_steps(self.lost)} "
                               f"acknowledged by step() were not written and no more can be; the ledger is valid "
                               f"up to seq {self._writer.next_seq - 1}: fix the cause, then continue with "
                               "Recorder.resume") from self.broken
        with self._lock:  # every checkpoint that failed since the last report, once (another failure comes next)
            failure: BaseException | None = self._checkpoints.take_failed()
            if failure is None and self._failure is not None:
                failure, self._failure = self._failure, None
        if failure is None:
            return
        lost = f"; {_steps(self.lost)} acknowledged by step() were not written" if self.lost else ""
        self.lost = []
        if isinstance(failure, CheckpointFailed):
            raise StorageError(f"{failure}{lost}; later step entries are still recorded") from failure.__cause__
        if isinstance(failure, LedgerError):
            raise type(failure)(f"{failure}{lost}") from failure
        raise failure

    def problems(self) -> list[str]:
        """The failures not raised yet, one sentence each (for a warning once the writer has stopped)."""
        problems = [failed] if (failed := self._checkpoints.unreported()) else []
        if self.broken is not None or self._failure is not None:
            problems.append(f"{reason(self.broken or self._failure)} ({_steps(self.lost)} not written)")
        return problems


def _steps(lost: list[int]) -> str:
    """'3 step entries (steps 40–42)', or '0 step entries'."""
    if not lost:
        return "0 step entries"
    span = f"step {lost[0]}" if len(lost) == 1 else f"steps {lost[0]}–{lost[-1]}"
    return f"{len(lost)} step entr{'y' if len(lost) == 1 else 'ies'} ({span})"
