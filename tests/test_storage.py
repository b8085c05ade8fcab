"""Writer, log, parts, recovery and lock, on real files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import write_ledger

import ledger
from ledger import ConfigurationError, FormatError, LedgerLockedError, LedgerWriter, Signer, StorageError
from ledger.verify import verify_ledger


def _snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_round_trip_with_rollover(make_ledger):
    path = make_ledger(25, rollover=10)
    parts = sorted(p.name for p in (path / "parts").iterdir())
    assert parts == ["000000.parquet", "000001.parquet", "000002.parquet"]
    book = ledger.open(path)
    entries = list(book.entries())
    assert [e.seq for e in entries] == list(range(27))
    assert [e.kind.label for e in entries][:2] == ["genesis", "step"] and entries[-1].kind.label == "seal"
    assert [e.step for e in entries[1:-1]] == list(range(25)) and entries[0].step == -1
    assert book.sealed and len(book) == 27
    frame = book.to_pandas()
    assert list(frame.columns[:5]) == ["seq", "kind", "step", "time", "hash"]
    assert frame.loc[frame.kind == "step", "loss"].tolist() == [1.0 / (i + 1) for i in range(25)]


def test_parts_are_plain_parquet(make_ledger):
    path = make_ledger(12)
    frame = pd.read_parquet(path / "parts")
    assert len(frame) == 14 and set(frame.kind) == {"genesis", "step", "seal"}
    table = pq.read_table(path / "parts" / "000000.parquet")
    assert table.schema.field("metrics").type.key_type.equals(table.schema.field("run_id").type)
    assert table.schema.metadata[b"training_ledger.format"] == b"1"


def test_append_reaches_the_os_before_returning(tmp_path, signer):
    writer = LedgerWriter.create(tmp_path / "L", signer, fsync="never")
    writer.append("step", 0, {"metrics": {"loss": 1.0}})
    # another reader sees it without the writer closing or syncing
    assert [e.kind.label for e in ledger.open(tmp_path / "L").entries()] == ["genesis", "step"]
    writer.close()


def test_reopen_continues_the_chain(make_ledger, signer):
    path = make_ledger(5, seal=False)
    writer = LedgerWriter.open(path, signer)
    assert writer.next_seq == 6 and writer.recovery.torn_bytes == 0
    writer.append("step", 5, {"metrics": {"loss": 0.1}})
    writer.seal()
    assert verify_ledger(path, key=signer.public).verdict == "pass"


def test_reopen_refuses_sealed_ledger_and_wrong_key(make_ledger, signer, tmp_path):
    with pytest.raises(ConfigurationError, match="sealed"):
        LedgerWriter.open(make_ledger(3), signer)
    other = ledger.Signer.from_seed(b"\x07" * 32)
    with pytest.raises(ConfigurationError, match="did not sign"):
        LedgerWriter.open(make_ledger(3, seal=False), other)


def test_create_refuses_existing_ledger_and_reserved_names(make_ledger, signer, tmp_path):
    path = make_ledger(2)
    before = _snapshot(path)
    with pytest.raises(ConfigurationError, match="a ledger"):
        LedgerWriter.create(path, signer)
    assert _snapshot(path) == before
    with pytest.raises(ConfigurationError, match="reserved"):
        LedgerWriter.create(tmp_path / "new", signer, genesis={"run_id": "mine"})


def test_second_writer_gets_a_clear_error(tmp_path, signer):
    writer = LedgerWriter.create(tmp_path / "L", signer)
    with pytest.raises(LedgerLockedError, match="another writer"):
        LedgerWriter.open(tmp_path / "L", signer)
    writer.close()
    LedgerWriter.open(tmp_path / "L", signer).close()  # free again after close


def test_second_writer_in_another_process(tmp_path, signer):
    import subprocess
    import sys

    writer = LedgerWriter.create(tmp_path / "L", signer)
    code = ("import ledger, sys\n"
            "try:\n ledger.LedgerWriter.open(sys.argv[1], ledger.Signer.from_seed(bytes(range(32))))\n"
            "except ledger.LedgerLockedError as e:\n print('locked:', e); sys.exit(7)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "L")], capture_output=True, text=True)
    assert out.returncode == 7 and "another writer" in out.stdout
    writer.close()


def test_torn_tail_is_dropped_reported_and_kept(tmp_path, signer):
    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, fsync="always")
    for i in range(4):
        writer.append("step", i, {"metrics": {"loss": float(i)}})
    good = (path / "wal.log").read_bytes()
    os.close(writer._wal._fd)  # simulate the process dying: no close, no roll, lock dropped
    writer._wal._fd = -1
    writer._lock.release()
    last_frame = ledger._wal.encode_frame(list(ledger.open(path).entries())[-1])
    with open(path / "wal.log", "ab") as handle:
        handle.write(last_frame[: len(last_frame) // 2])  # a torn, never-acknowledged append
    book = ledger.open(path)
    assert len(book) == 5 and len(book.wal_torn) == len(last_frame) // 2
    report = verify_ledger(path, key=signer.public)
    assert report.verdict == "pass" and report.ledger["torn_tail_bytes"] == len(last_frame) // 2
    reopened = LedgerWriter.open(path, signer)
    assert reopened.recovery.recovered_entries == 5 and reopened.recovery.torn_bytes == len(last_frame) // 2
    assert reopened.recovery.torn_saved_to.read_bytes() == last_frame[: len(last_frame) // 2]
    assert reopened.next_seq == 5
    reopened.seal()
    assert len(good) > 8 and verify_ledger(path, key=signer.public).check("seal").status == "pass"


def test_corrupt_interior_log_frame_is_not_repaired(tmp_path, signer):
    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer)
    for i in range(3):
        writer.append("step", i, {"metrics": {"loss": float(i)}})
    data = bytearray((path / "wal.log").read_bytes())
    data[20] ^= 0xFF  # inside the genesis frame's payload
    os.close(writer._wal._fd)
    writer._wal._fd = -1
    writer._lock.release()
    (path / "wal.log").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupt"):
        LedgerWriter.open(path, signer)
    report = verify_ledger(path, key=signer.public)
    assert report.check("chain").status == "fail" and "corrupt" in report.check("chain").detail


def test_interrupted_roll_duplicates_are_ignored(make_ledger, signer):
    """A crash after a part's rename but before the log reset leaves the same frames in both."""
    path = make_ledger(6, seal=False)
    entries = list(ledger.open(path).entries())
    (path / "wal.log").write_bytes(ledger._wal.MAGIC + b"".join(ledger._wal.encode_frame(e) for e in entries[-3:]))
    assert [e.seq for e in ledger.open(path).entries()] == list(range(7))
    LedgerWriter.open(path, signer).seal()
    assert verify_ledger(path, key=signer.public).verdict == "pass"


def test_readers_and_verify_leave_the_ledger_byte_identical(make_ledger, signer):
    for sealed in (True, False):
        path = make_ledger(30, rollover=7, seal=sealed)
        before = _snapshot(path)
        verify_ledger(path, key=signer.public)
        verify_ledger(path, sample=3)
        ledger.open(path).to_pandas()
        assert _snapshot(path) == before
        assert not (path / "writer.lock.tmp").exists()


def test_not_a_ledger(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for target, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "file.txt", "is a file"),
                            (tmp_path / "empty", "not a ledger")]:
        with pytest.raises(ledger.NotALedgerError, match=message):
            ledger.open(target)


def test_group_commit_policy_is_validated(tmp_path, signer):
    with pytest.raises(ConfigurationError, match="fsync"):
        LedgerWriter.create(tmp_path / "L", signer, fsync="sometimes")


def test_manifest_is_written_but_not_trusted(make_ledger, signer):
    import json

    path = make_ledger(4)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["entries"] == 6 and manifest["sealed"] and manifest["parts"][0]["seq"] == "0-5"
    (path / "manifest.json").write_text("{not json")
    assert verify_ledger(path, key=signer.public).verdict == "pass"


def test_write_ledger_is_deterministic_with_injected_clock_and_run_id(tmp_path, signer):
    a = write_ledger(tmp_path / "a", signer, 5, run_id="r1")
    b = write_ledger(tmp_path / "b", signer, 5, run_id="r1")
    assert [e.record for e in ledger.open(a).entries()] == [e.record for e in ledger.open(b).entries()]


# ----------------------------------------------------------------------------- the lock cannot be deleted
_SECOND_WRITER = ("import ledger, sys\n"
                  "try:\n ledger.LedgerWriter.open(sys.argv[1], ledger.Signer.from_seed(bytes(range(32))))\n"
                  "except ledger.LedgerLockedError as e:\n print('locked:', e); sys.exit(7)\n")


def test_deleting_files_under_a_live_writer_does_not_free_the_lock(tmp_path, signer):
    import subprocess
    import sys

    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, rollover_entries=2)
    for name in ("writer.lock", "wal.log"):  # an old lock file, or anything a lock file could be
        (path / name).unlink(missing_ok=True)
    for i in range(3):  # roll-overs replace wal.log: the lock is on the directory, not on it
        writer.append("step", i, {"metrics": {"loss": 1.0}})
    out = subprocess.run([sys.executable, "-c", _SECOND_WRITER, str(path)], capture_output=True, text=True)
    assert out.returncode == 7 and "another writer" in out.stdout
    writer.close()
    out = subprocess.run([sys.executable, "-c", _SECOND_WRITER, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_killed_writer_releases_the_lock(tmp_path, signer):
    import subprocess
    import sys

    path = tmp_path / "L"
    LedgerWriter.create(path, signer).close()
    code = ("import ledger, sys, os\n"
            "w = ledger.LedgerWriter.open(sys.argv[1], ledger.Signer.from_seed(bytes(range(32))))\n"
            "print('open', flush=True)\nos.kill(os.getpid(), 9)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.stdout.strip() == "open" and out.returncode == -9
    LedgerWriter.open(path, signer).seal()


# ----------------------------------------------------------------------------- a forked chain is refused
def _fork(make_ledger, signer, tmp_path) -> tuple[Path, Path]:
    """Two copies of one ledger, each continued with a different entry 6 (closed: in part 000001)."""
    import shutil

    path = make_ledger(5, seal=False)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    for target, loss in ((path, 0.5), (copy, 0.25)):
        writer = LedgerWriter.open(target, signer)
        writer.append("step", 5, {"metrics": {"loss": loss}})
        writer.close()
    return path, copy


def test_open_refuses_two_parts_with_the_same_seq(make_ledger, signer, tmp_path):
    path, copy = _fork(make_ledger, signer, tmp_path)
    (path / "parts" / "000002.parquet").write_bytes((copy / "parts" / "000001.parquet").read_bytes())
    before = _snapshot(path)
    with pytest.raises(FormatError, match="two entries with seq 6"):
        LedgerWriter.open(path, signer)
    assert _snapshot(path) == before
    LedgerWriter.open(copy, signer).seal()  # the copy alone is one chain


def test_open_refuses_a_log_frame_that_differs_from_the_part_with_its_seq(make_ledger, signer, tmp_path):
    path, copy = _fork(make_ledger, signer, tmp_path)
    other = [e for e in ledger.open(copy).entries() if e.seq == 6]
    (path / "wal.log").write_bytes(ledger._wal.MAGIC + ledger._wal.encode_frame(other[0]))
    with pytest.raises(FormatError, match="two different entries with seq 6"):
        LedgerWriter.open(path, signer)


def test_open_refuses_an_entry_that_does_not_link(make_ledger, signer, tmp_path):
    from ledger._encoding import encode_body
    from ledger._record import FORMAT_VERSION, Header, Kind, encode_record, run_digest

    path = make_ledger(3, seal=False)
    book = ledger.open(path)
    last = book.last_entry()
    header = Header(FORMAT_VERSION, Kind.STEP, last.seq + 1, 3, 0, run_digest(book.run_id), b"\x01" * 32)
    record = encode_record(header, encode_body({"metrics": {}}))
    entry = ledger.Entry(record=record, signature=signer.sign(record), key_id=signer.public.key_id)
    (path / "wal.log").write_bytes(ledger._wal.MAGIC + ledger._wal.encode_frame(entry))
    with pytest.raises(FormatError, match=f"entry {last.seq + 1} does not link"):
        LedgerWriter.open(path, signer)


# ----------------------------------------------------------------------------- a failed create leaves nothing
def _unwritable(tmp_path: Path) -> tuple[Path, str]:
    """A directory this process cannot write into, or (as root, whom modes do not stop) a path under
    a regular file."""
    if os.geteuid() == 0:
        (tmp_path / "file").write_text("x")
        return tmp_path / "file", "Not a directory"
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    return locked, "Permission denied"


def test_create_in_an_unwritable_place_is_a_storage_error_and_leaves_nothing(tmp_path, signer):
    from ledger import StorageError

    parent, reason = _unwritable(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    try:
        for target in (parent / "L", parent / "a" / "b" / "L"):
            with pytest.raises(StorageError, match=reason) as caught:
                LedgerWriter.create(target, signer)
            assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
        if parent.is_dir():  # a pre-existing empty, read-only directory: create refuses and it stays
            with pytest.raises(StorageError, match=reason):
                LedgerWriter.create(parent, signer)
            assert parent.is_dir() and list(parent.iterdir()) == []
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
    finally:
        if parent.is_dir():
            parent.chmod(0o700)


def test_create_failing_after_the_first_files_removes_exactly_those(tmp_path, signer, monkeypatch):
    import errno

    from ledger import StorageError

    empty = tmp_path / "mine"
    empty.mkdir()
    fresh = tmp_path / "a" / "b" / "L"
    for target in (empty, fresh):
        def full(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(StorageError, match="No space left"):
            LedgerWriter.create(target, signer)
        monkeypatch.undo()
    assert empty.is_dir() and list(empty.iterdir()) == []  # pre-existing: kept, emptied of what create made
    assert not (tmp_path / "a").exists()  # every directory create made is gone
    LedgerWriter.create(empty, signer).seal()  # and the directory is usable afterwards
    assert verify_ledger(empty, key=signer.public).verdict == "pass"


def test_ledger_at_a_path_that_is_not_utf8(tmp_path, signer):
    path = tmp_path / os.fsdecode(b"run-\xff")
    writer = LedgerWriter.create(path, signer, rollover_entries=2)
    for i in range(3):
        writer.append("step", i, {"metrics": {"loss": 1.0}})
    writer.close()
    assert sorted(p.name for p in (path / "parts").iterdir()) == ["000000.parquet", "000001.parquet"]
    reopened = LedgerWriter.open(path, signer)
    assert reopened.next_seq == 4
    reopened.seal()
    assert len(ledger.open(path)) == 5


# ----------------------------------------------------------------------------- the directory under the writer
def test_a_ledger_directory_moved_under_its_writer_is_never_written_by_its_old_path(tmp_path, signer):
    """Renamed under a live writer, with a second ledger created at the old path (the lock is on the
    old inode, so it gets in): the first writer's roll-overs must not land in the second ledger."""
    path, moved = tmp_path / "L", tmp_path / "L.old"
    first = LedgerWriter.create(path, signer, rollover_entries=4)
    first.append("step", 0, {"metrics": {"loss": 1.0}})
    os.rename(path, moved)
    second = LedgerWriter.create(path, Signer.from_seed(bytes(32)))
    second.append("step", 0, {"metrics": {"loss": 2.0}})
    before = _snapshot(path)
    with pytest.warns(RuntimeWarning, match="could not roll"):
        for i in range(1, 3):  # the 4th entry triggers a roll: refused, the entry is in the old log
            first.append("step", i, {"metrics": {"loss": 1.0}})
    with pytest.raises(StorageError, match="moved under its writer"):
        first.append("step", 3, {"metrics": {"loss": 1.0}})
    with pytest.raises(StorageError, match="moved under its writer"):
        first.close()
    assert first.closed and _snapshot(path) == before  # the second ledger is untouched
    second.close()
    assert verify_ledger(path).verdict == "pass"
    assert [e.seq for e in ledger.open(moved).entries()] == [0, 1, 2, 3]
    LedgerWriter.open(moved, signer).seal()  # the lock was released; the moved ledger recovers
    assert verify_ledger(moved, key=signer.public).verdict == "pass"


# ----------------------------------------------------------------------------- forked children
def test_a_forked_child_does_not_keep_the_lock(tmp_path, signer):
    """A child forked while the writer is open (a DataLoader worker) neither holds the lock after the
    parent closes nor can append."""
    import signal
    import time

    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer)
    writer.append("step", 0, {"metrics": {"loss": 1.0}})
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never touches the ledger on purpose; it tries once, then sleeps
        try:
            os.close(read)
            try:
                writer.append("step", 1, {"metrics": {"loss": 1.0}})
                os.write(write, b"appended")
            except StorageError:
                os.write(write, b"refused")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(write)
        assert os.read(read, 16) == b"refused"
        writer.close()
        reopened = LedgerWriter.open(path, signer)  # the child is still alive
        reopened.append("step", 1, {"metrics": {"loss": 1.0}})
        reopened.seal()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
    assert [e.seq for e in ledger.open(path).entries()] == [0, 1, 2, 3]
    assert verify_ledger(path, key=signer.public).verdict == "pass"


def test_readers_see_a_consistent_prefix_while_a_writer_appends(tmp_path, signer):
    """`ledger verify` and `info` on a run still training: the log grows while it is read, and every
    read sees the frames it held when opened (a live log once failed as 'changed size')."""
    import threading

    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, rollover_entries=1 << 16)
    stop = threading.Event()

    def append() -> None:
        i = 0
        while not stop.is_set():
            writer.append("step", i, {"metrics": {"loss": 1.0}, "pad": b"x" * 2000})
            i += 1

    thread = threading.Thread(target=append)
    thread.start()
    try:
        seen = []
        for _ in range(40):
            seen.append(len(ledger.open(path)))
        report = verify_ledger(path, key=signer.public)
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert seen == sorted(seen) and seen[-1] > seen[0]  # it grew, and each read was whole
    assert report.check("chain").status == "pass"


def test_a_writer_never_rolls_past_the_parts_a_reader_reads(tmp_path, signer, monkeypatch):
    """At the readers' part cap the writer keeps entries in its log and says why; what it leaves
    reads and verifies."""
    import warnings

    from ledger import _parts

    monkeypatch.setattr(_parts, "MAX_PARTS", 3)  # the cap, shrunk so the test stays small
    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, rollover_entries=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(12):
            writer.append("step", i, {"metrics": {"loss": 1.0}})
    assert any("the most a reader reads" in str(w.message) for w in caught)
    with pytest.raises(StorageError, match="holds 3 parts, the most a reader reads; start a new ledger"):
        writer.close()
    writer.release()
    assert len(list((path / "parts").glob("*.parquet"))) == 3 and len(ledger.open(path)) == 13
    assert verify_ledger(path, key=signer.public).check("chain").status == "pass"


@pytest.mark.slow
def test_parts_of_repetitive_text_are_read_whatever_they_compress_to(tmp_path, signer):
    """Two honest parts of ~40 MB of records that zstd would shrink ~100×: the writer writes them
    uncompressed, so they stay within the readers' decode budget (64 MiB once + 32 × the bytes on
    disk), which refused the second part when it was written compressed."""
    text = ("The quick brown fox jumps over the lazy dog. " * 400)[:16000]
    path = tmp_path / "L"
    writer = LedgerWriter.create(path, signer, rollover_entries=2500, fsync="never")
    for i in range(5000):
        writer.append("step", i, {"metrics": {"loss": 1.0}, "prompt": text})
    writer.seal()
    parts = sorted((path / "parts").glob("*.parquet"))
    assert len(parts) >= 2
    for part in parts:
        meta = pq.read_metadata(part)
        decoded = sum(meta.row_group(g).column(c).total_uncompressed_size
                      for g in range(meta.num_row_groups) for c in range(meta.num_columns))
        assert decoded <= 16 * part.stat().st_size, part.name
    report = verify_ledger(path, key=signer.public)
    assert report.check("chain").status == "pass" and report.check("seal").status == "pass"
