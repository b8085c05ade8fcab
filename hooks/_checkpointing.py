"""The recorder's checkpoints: a snapshot taken on the training thread, its files written and its
entry appended on the writer thread, retention, the checkpoints that could not be written (kept for
the training thread to report), and the undoing of a failed ``Recorder()``."""

from __future__ import annotations

import shutil
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ledger import torch as lt
from ledger._record import Kind
from ledger._schema import CheckpointBody, Genesis, PruneBody, StepBody, checkpoint_root
from ledger._writer import LedgerWriter
from ledger.hooks import _resume

Body = StepBody | CheckpointBody | PruneBody
Alive = tuple[int, int, CheckpointBody]  # (seq, step, body) of a checkpoint retention has not pruned


class Checkpoints:
    """The checkpoints of one recorded run under ``root``: those alive, the step of the last one
    taken, and those whose files could not be written, kept under ``lock`` (shared with the
    recorder's other background failures) until the training thread reports them.

    ``append`` appends one typed entry and returns its seq (the recorder's, so that every entry
    goes through one place)."""

    def __init__(self, path: Path, genesis: Genesis, writer: LedgerWriter, append: Callable[[Kind, int, Body], int],
                 *, keep: tuple[str, int] | None, lock: threading.Lock, last_step: int | None,
                 alive: Sequence[Alive] = ()) -> None:
        self.path, self.keep, self.last_step = path, keep, last_step
        self.root = checkpoint_root(path, genesis)
        self.alive: list[Alive] = list(alive)
        self._genesis, self._writer, self._append, self._lock = genesis, writer, append, lock
        self._failed: list[tuple[int, BaseException]] = []  # (step, why) not reported yet

    def take(self, step: int, model: Any, optimizer: Any, scheduler: Any) -> lt.Snapshot:
        """The training state after ``step`` (on the training thread), the last checkpoint taken."""
        snap = lt.snapshot(step, model, optimizer, scheduler)
        self.last_step = step
        return snap

    def write(self, snap: lt.Snapshot, ranks: list[bytes] | None = None) -> None:
        """On the writer thread: write the files; a failure there is reported and recording goes on
        (step entries do not depend on it); a failure to append the entry stops the writer.
        ``ranks``: every rank's model digest at this step (distributed runs)."""
        try:
            stored = self.store(snap)
        except Exception as exc:  # noqa: BLE001 - reported on the training thread
            with self._lock:
                self._failed.append((snap.step, exc))
            return
        self.enter(snap, *stored, ranks)

    def store(self, snap: lt.Snapshot) -> tuple[Path, Any, bool]:
        """Write a snapshot's files durably under the checkpoint root (directory, digests, and
        whether this run created the directory)."""
        return lt.place_checkpoint(snap, self.root, tag=_resume.run_tag(self._writer.run_id))

    def enter(self, snap: lt.Snapshot, directory: Path, digests: Any, created: bool,
              ranks: list[bytes] | None = None) -> None:
        """Append the entry of a written checkpoint (``created``: whether this run made its directory;
        retention never deletes one it did not), then apply retention."""
        self._writer.sync()
        body = CheckpointBody.of(digests, self._stored_path(directory),
                                 [{k: v for k, v in g.items() if k != "params"} for g in snap.meta["param_groups"]],
                                 created, ranks)
        seq = self._append(Kind.CHECKPOINT, snap.step, body)
        self._writer.sync()
        self.alive.append((seq, snap.step, body))
        self._apply_retention()

    def _stored_path(self, directory: Path) -> str:
        """A checkpoint's ``path`` (docs/FORMAT.md §11): ``checkpoints/<hex>``, relative to the ledger
        directory, for the default root; the absolute ``<checkpoint_dir>/<hex>`` for a user root."""
        if self._genesis.checkpoint_dir:
            return str(directory.absolute())
        return f"checkpoints/{directory.name}"

    def _apply_retention(self) -> None:
        if not self.keep:
            return
        mode, n = self.keep
        alive = self.alive
        if mode == "last":
            drop = alive[:-n] if len(alive) > n else []
        else:  # every n-th checkpoint by position, the init state and the newest stay
            drop = [c for i, c in enumerate(alive[:-1]) if i % n and c[1] != -1]
        for seq, step, body in drop:
            # the prune entry first: a kill in between leaves a pruned directory, which resume removes
            self._append(Kind.PRUNE, step, PruneBody(seq, body.state_digest, f"retention: keep {mode} {n}"))
            alive.remove((seq, step, body))
            _resume.remove_checkpoint(self.path, body, self._genesis, [b.state_digest for _, _, b in alive])

    def take_failed(self) -> CheckpointFailed | None:
        """Every checkpoint that failed since the last call, as one exception (None when none); the
        caller holds ``lock``."""
        failed, self._failed = self._failed, []
        return CheckpointFailed(failed, self.root) if failed else None

    def unreported(self) -> str | None:
        """The checkpoints that failed and were not reported, in one sentence (None when none)."""
        return str(CheckpointFailed(self._failed, self.root)) if self._failed else None


class CheckpointFailed(Exception):
    """Checkpoints whose files could not be written (the run goes on without them)."""

    def __init__(self, failed: Sequence[tuple[int, BaseException]], root: Path) -> None:
        steps = [step for step, _ in failed]
        reasons = list(dict.fromkeys(reason(exc) for _, exc in failed))
        which = f"the checkpoint of step {steps[0]}" if len(steps) == 1 else \
            f"the checkpoints of steps {', '.join(map(str, steps))}"
        super().__init__(f"could not write {which} under {root}: {'; '.join(reasons)}")
        self.steps = steps
        self.__cause__ = failed[0][1]


def reason(exc: BaseException | None) -> str:
    """Why something failed, in a few words (an OSError's strerror, else the exception's message)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


def undo_construction(root: Path, existed: bool, made: Path | None) -> None:
    """Remove what a failed ``Recorder()`` made: the ledger directory (emptied, when it was an empty
    directory before) and the init checkpoint's directory in a ``checkpoint_dir``; a warning names
    what could not be removed."""
    left: list[str] = []

    def remove(path: Path) -> None:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, onerror=lambda function, name, exc: left.append(name))
            else:
                path.unlink()
        except OSError as exc:
            left.append(exc.filename or str(path))

    if made is not None and not made.absolute().is_relative_to(root.absolute()):
        remove(made)
    if not existed:
        remove(root)
    else:
        try:
            children = list(root.iterdir())
        except OSError:
            children = []
        for child in children:
            remove(child)
    if left:
        warnings.warn(f"could not remove {left[0]} after Recorder() failed: delete it", RuntimeWarning, stacklevel=3)
