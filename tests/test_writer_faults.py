"""The writer when the disk refuses: ENOSPC at every write call in turn, a write the kernel really cuts
short (RLIMIT_FSIZE), roll-over failures, and recovery of logs a failed write left behind.

Real files, real signatures, real verification: only ``os.write`` is wrapped, to fail where told.
Run ``python tests/test_writer_faults.py`` to print the injection tally (docs/RELIABILITY.md).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ledger
from ledger import LedgerWriter, Signer, StorageError
from ledger.verify import verify_ledger

SEED = bytes(range(32))
STEPS = 9
ROLLOVER = 4
INTEGRITY = ("chain", "signatures")


def _clock() -> Callable[[], int]:
    counter = itertools.count()
    return lambda: 1_767_225_600_000_000_000 + 1_000_000 * next(counter)


class DiskFull:
    """Stands in for ``os.write``: the real write, except at call ``fail_at``. ``mode``: "once" (that
    call fails with ENOSPC, the next succeed), "full" (that call and every later one fail until
    :meth:`space_returns`), "short" (that call writes half its bytes and returns the short count, then
    the disk is full), "blip" (half written, the next call fails, then space is back: the issue's case)."""

    def __init__(self, fail_at: int = 0, mode: str = "once") -> None:
        self.real, self.fail_at, self.mode = os.write, fail_at, mode
        self.calls, self.full, self.fired = 0, False, False

    def __call__(self, fd: int, data: Any) -> int:
        self.calls += 1
        if self.full:
            self.full = self.mode != "blip"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.calls == self.fail_at:
            self.fired = True
            if self.mode in ("short", "blip") and len(data) > 1:
                self.full = True
                return self.real(fd, bytes(data[: len(data) // 2]))
            self.full = self.mode != "once"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)

    def space_returns(self) -> None:
        self.full, self.fail_at = False, 0


def _body(i: int) -> dict[str, Any]:
    return {"metrics": {"loss": 1.0 / (i + 1)}, "pad": b"p" * (40 * (i % 5))}


def run_scenario(path: Path, disk: DiskFull) -> tuple[str, str]:
    """create + STEPS appends (roll-overs every ROLLOVER) + close with ``disk`` as ``os.write``;
    then space returns and everything is checked. Returns (outcome, what went wrong or "")."""
    signer = Signer.from_seed(SEED)
    acked: list[ledger.Entry] = []
    raised: list[str] = []
    real = os.write
    os.write = disk
    writer = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                writer = LedgerWriter.create(path, signer, run_id="faults", clock=_clock(), fsync="always",
                                             rollover_entries=ROLLOVER)
            except StorageError as exc:
                raised.append(f"create: {exc}")
            if writer is not None:
                for i in range(STEPS):
                    try:
                        acked.append(writer.append("step", i, _body(i)))
                    except StorageError as exc:
                        raised.append(f"append: {exc}")
                try:  # what a reader (or a recovery after a crash) sees now, the writer still open
                    live = {e.seq: e for e in ledger.open(path).entries()}
                except Exception as exc:
                    return "bad", f"reading the live ledger: {type(exc).__name__}: {exc}"
                if [e.seq for e in acked if live.get(e.seq) != e]:
                    return "bad", "acknowledged entries missing from the live ledger"
                try:
                    writer.close()
                except StorageError as exc:
                    raised.append(f"close: {exc}")
    except Exception as exc:  # anything but StorageError is a bad outcome
        return "bad", f"{type(exc).__name__}: {exc}"
    finally:
        os.write = real
        disk.space_returns()
    try:
        if writer is None:  # create failed: it must leave nothing, and the path must work afterwards
            if path.exists():
                return "bad", f"failed create left {sorted(p.name for p in path.rglob('*'))}"
            LedgerWriter.create(path, signer).close()
            return "create refused", ""
        if not writer.closed:
            writer.close()  # space is back: closing again works (or releases a broken writer)
        entries = {e.seq: e for e in ledger.open(path).entries()}
        if sorted(entries) != list(range(len(entries))):
            return "bad", f"seqs not contiguous: {sorted(entries)}"
        lost = [e.seq for e in acked if entries.get(e.seq) != e]
        if lost:
            return "bad", f"acknowledged entries lost or changed: {lost}"
        report = verify_ledger(path, key=signer.public, workers=1)
        failed = [c.name for c in report.checks if c.name in INTEGRITY and c.status != "pass"]
        if failed:
            return "bad", f"integrity checks failed before reopening: {failed}"
        reopened = LedgerWriter.open(path, signer, clock=_clock())
        reopened.append("step", STEPS, _body(STEPS))
        reopened.seal()
        report = verify_ledger(path, key=signer.public, workers=1)
        failed = [c.name for c in report.checks if c.name in (*INTEGRITY, "seal") and c.status != "pass"]
        if failed:
            return "bad", f"integrity checks failed after reopening: {failed}"
        if len(ledger.open(path)) < len(acked) + 3:
            return "bad", "entries missing after reopening"
    except Exception as exc:
        return "bad", f"after space returned: {type(exc).__name__}: {exc}"
    return ("raised then recovered" if raised else "continued"), ""


def count_writes(tmp: Path) -> int:
    disk = DiskFull()
    outcome, why = run_scenario(tmp / "dry", disk)
    assert outcome == "continued", why
    return disk.calls


def tally(tmp: Path, modes: tuple[str, ...] = ("once", "full", "short", "blip")) -> dict[str, Any]:
    """Every (mode, write call) injection: outcome counts and the bad cases."""
    total = count_writes(tmp)
    outcomes: Counter[str] = Counter()
    bad: list[str] = []
    for mode in modes:
        for k in range(1, total + 1):
            disk = DiskFull(k, mode)
            outcome, why = run_scenario(tmp / f"{mode}-{k}", disk)
            outcomes[outcome] += 1
            if outcome == "bad":
                bad.append(f"{mode} at write {k}: {why}")
    return {"write_calls": total, "injections": total * len(modes), "outcomes": dict(outcomes), "bad": bad}


@pytest.mark.slow
def test_enospc_at_every_write_call_loses_nothing_acknowledged(tmp_path):
    result = tally(tmp_path)
    print(json.dumps({k: v for k, v in result.items() if k != "bad"}))
    assert result["write_calls"] > 20  # log frames, parts (through pyarrow), log resets, manifests
    assert result["bad"] == [], "\n".join(result["bad"])
    assert result["outcomes"].get("raised then recovered", 0) > 0


def test_a_failed_append_leaves_no_torn_frame_and_the_writer_goes_on(tmp_path, signer):
    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, fsync="always")
    writer.append("step", 0, _body(0))
    size = (path / "wal.log").stat().st_size
    disk = DiskFull(1, "short")
    os.write = disk
    try:
        with pytest.raises(StorageError, match="could not append entry 2 .*No space left"):
            writer.append("step", 1, _body(1))
    finally:
        os.write = disk.real
    assert disk.fired and (path / "wal.log").stat().st_size == size  # cut back to the last whole frame
    assert writer.next_seq == 2  # the head did not move for the entry that did not land
    for i in range(1, 4):
        writer.append("step", i, _body(i))
    writer.close()
    assert [e.step for e in ledger.open(path).entries()] == [-1, 0, 1, 2, 3]
    assert verify_ledger(path, key=signer.public).verdict == "pass"


def test_a_torn_frame_that_cannot_be_cut_back_breaks_the_writer(tmp_path, signer, monkeypatch):
    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, fsync="always")
    disk = DiskFull(1, "short")

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "write", disk)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(StorageError, match="No space left"):
        writer.append("step", 0, _body(0))
    monkeypatch.undo()
    with pytest.raises(StorageError, match="reopen the ledger"):
        writer.append("step", 0, _body(0))  # nothing is ever appended after a torn frame
    writer.close()  # releases the lock without touching the log
    reopened = LedgerWriter.open(path, signer)
    assert reopened.recovery.torn_bytes > 0 and reopened.recovery.torn_saved_to is not None
    assert reopened.next_seq == 1
    reopened.append("step", 0, _body(0))
    reopened.seal()
    assert verify_ledger(path, key=signer.public).verdict == "pass"


def test_a_log_appended_after_a_torn_frame_recovers_its_whole_prefix(tmp_path, signer):
    """What the writer before this fix left after ENOSPC: a torn frame, then more frames."""
    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, fsync="always")
    entries = [writer.append("step", i, _body(i)) for i in range(5)]
    writer._wal.close()
    writer._lock.release()
    frames = [ledger._wal.encode_frame(e) for e in entries]
    genesis = ledger._wal.encode_frame(next(iter(ledger.open(path).entries())))
    torn = frames[2][: len(frames[2]) // 2]
    after = frames[2] + frames[3] + frames[4]  # the same entries appended again after the torn one
    (path / "wal.log").write_bytes(ledger._wal.MAGIC + genesis + frames[0] + frames[1] + torn + after)
    book = ledger.open(path)
    assert [e.seq for e in book.entries()] == [0, 1, 2] and len(book.wal_torn) == len(torn) + len(after)
    reopened = LedgerWriter.open(path, signer)
    assert reopened.recovery.recovered_entries == 3 and reopened.recovery.set_aside_entries == 3
    assert reopened.recovery.torn_saved_to.read_bytes() == torn + after
    assert reopened.next_seq == 3
    reopened.seal()
    assert verify_ledger(path, key=signer.public).verdict == "pass"


def test_a_failed_rollover_keeps_every_entry_and_is_retried(tmp_path, signer):
    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, rollover_entries=3, fsync="never")
    disk = DiskFull(3, "full")  # two frames land, the part of the roll the second one triggers does not
    os.write = disk
    try:
        with pytest.warns(RuntimeWarning, match="could not roll"):
            writer.append("step", 0, _body(0))
            writer.append("step", 1, _body(1))
        with pytest.raises(StorageError, match="could not append entry 3"):
            writer.append("step", 2, _body(2))
        with pytest.raises(StorageError, match="close again when there is space"):
            writer.close()
    finally:
        os.write = disk.real
    assert not writer.closed and list((path / "parts").iterdir()) == []  # no partial part left
    assert [e.seq for e in ledger.open(path).entries()] == [0, 1, 2]
    writer.append("step", 2, _body(2))
    writer.close()  # space is back
    assert [p.name for p in sorted((path / "parts").iterdir())] == ["000000.parquet"]
    assert len(ledger.open(path)) == 4 and verify_ledger(path, key=signer.public).verdict == "pass"


# ----------------------------------------------------------------------------- the kernel cuts a frame short
CHILD = r"""
import json, os, resource, signal, sys
import ledger
from ledger import LedgerWriter, Signer, StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
path = sys.argv[1]
writer = LedgerWriter.create(path, Signer.from_seed(bytes(range(32))), fsync="never", rollover_entries=65536)
limit = os.path.getsize(os.path.join(path, "wal.log")) + 6000
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
real, short = os.write, []
def spy(fd, data):  # only watches: the kernel decides how much lands
    n = real(fd, data)
    if n < len(data):
        short.append([n, len(data)])
    return n
os.write = spy
acked, errors = [], []
for i in range(100):
    try:
        acked.append(writer.append("step", i, {"pad": b"x" * 1500}).seq)
    except StorageError as exc:
        errors.append(str(exc))
        break
for i in range(3):
    acked.append(writer.append("step", 100 + i, {"pad": b""}).seq)  # small entries still fit after the cut-back
size = os.path.getsize(os.path.join(path, "wal.log"))
print(json.dumps({"acked": acked, "errors": errors, "short": short, "size": size, "limit": limit}))
sys.stdout.flush()
os._exit(0)  # die without closing
"""


def test_a_frame_the_kernel_cuts_short_is_cut_back(tmp_path, signer):
    path = tmp_path / "L"
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["short"], "the kernel never returned a short write"
    assert facts["errors"] and "File too large" in facts["errors"][0]
    scan = ledger._wal.read(path / "wal.log")
    assert scan.torn == b"" and scan.valid_bytes == facts["size"] <= facts["limit"]
    present = {e.seq for e in ledger.open(path).entries()}
    assert set(facts["acked"]) <= present and sorted(present) == list(range(len(present)))
    assert verify_ledger(path, key=signer.public).verdict == "pass"
    reopened = LedgerWriter.open(path, signer)
    assert reopened.recovery.torn_bytes == 0
    reopened.seal()
    assert verify_ledger(path, key=signer.public).check("seal").status == "pass"


def test_rolls_failing_until_the_log_is_full_refuse_the_entry_not_the_ledger(tmp_path, signer, monkeypatch):
    """While parts cannot be written, entries stay in the log; at the readers' cap the next append is
    refused (StorageError) rather than written past it, and the ledger still opens and verifies."""
    from ledger import _parts, _wal

    monkeypatch.setattr(_wal, "MAX_LOG_FRAMES", 40)  # the cap, shrunk so the test stays small

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, rollover_entries=10)
    real_write_part = _parts.write_part
    monkeypatch.setattr(_parts, "write_part", no_space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "could not roll …; retried"
        for i in range(39):
            writer.append("step", i, _body(i))
        with pytest.raises(StorageError, match="as many as readers accept"):
            writer.append("step", 39, _body(39))
    assert len(ledger.open(path)) == 40  # genesis + 39 steps, all in the log, none past the cap
    monkeypatch.setattr(_parts, "write_part", real_write_part)  # space returns
    writer.append("step", 39, _body(39))
    writer.seal()
    report = verify_ledger(path, key=signer.public)
    assert report.check("chain").status == "pass" and len(ledger.open(path)) == 42


def test_rollover_settings_past_what_readers_accept_are_refused(tmp_path, signer):
    from ledger import _wal

    with pytest.raises(ledger.ConfigurationError, match="rollover_entries must be 1 to 65536"):
        LedgerWriter.create(tmp_path / "a", signer, rollover_entries=_wal.MAX_LOG_FRAMES + 1)
    with pytest.raises(ledger.ConfigurationError, match="rollover_bytes"):
        LedgerWriter.create(tmp_path / "b", signer, rollover_bytes=_wal.MAX_LOG)


if __name__ == "__main__":  # the tally for docs/RELIABILITY.md
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(tally(Path(tmp)), indent=1))


def test_release_gives_up_a_failed_close_and_open_recovers(tmp_path, signer):
    """The final roll fails (disk full): release() closes the log and frees the lock without rolling;
    the entries stay in the log and the ledger reopens in the same process."""
    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, fsync="never")
    for i in range(3):
        writer.append("step", i, _body(i))
    disk = DiskFull(1, "full")
    os.write = disk
    try:
        with pytest.raises(StorageError, match="close again when there is space"):
            writer.close()
        writer.release()
    finally:
        os.write = disk.real
    assert writer.closed and not writer._lock.held
    writer.release()  # idempotent
    reopened = LedgerWriter.open(path, signer)
    assert reopened.recovery.recovered_entries == 4
    reopened.seal()
    assert len(ledger.open(path)) == 5 and verify_ledger(path, key=signer.public).verdict == "pass"


def test_a_forked_child_sees_the_recorders_writer_queue_as_stopped():
    """A child forked from a training process has the queue but not its thread: a put there would
    wait for a writer that never runs, so the queue says it is stopped."""
    from ledger.hooks._queue import WriterQueue

    queue = WriterQueue(lambda job: None, 8, 0.05)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if queue.stopped else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0 and not queue.stopped
    finally:
        queue.stop()
