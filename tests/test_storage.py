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
from ledger import ConfigurationError, FormatError, LedgerLockedError, LedgerWriter
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
