"""Tamper matrix: each change to a real ledger on disk is caught by the right check, naming the
first bad entry by seq, with exit code 1 — and clean prefixes are valid unsealed ledgers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_ledger

from ledger import Signer
from ledger._cli import main
from ledger._crypto import public_key_pem

ROW = 5  # seq 5 sits in part 000000 (rollover 10)


def run(capsys, *args: str) -> tuple[int, dict]:
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", *map(str, args), "--json"])
    out = capsys.readouterr().out
    return exit_info.value.code, json.loads(out)


@pytest.fixture
def book(tmp_path: Path, signer: Signer) -> tuple[Path, Path]:
    path = write_ledger(tmp_path / "L", signer, 25, rollover=10)
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(signer.public.raw))
    return path, pub


def rewrite(part: Path, change) -> None:
    table = pq.read_table(part)
    meta = table.schema.metadata
    table = change(table)
    pq.write_table(table.replace_schema_metadata(meta), part, compression="zstd")


def set_cell(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table[column].to_pylist()
    values[row] = value
    index = table.schema.get_field_index(column)
    return table.set_column(index, table.schema.field(column), pa.array(values, table.schema.field(column).type))


def flip(b: bytes, at: int = -1) -> bytes:
    data = bytearray(b)
    data[at] ^= 0x01
    return bytes(data)


CELL_CHANGES = {
    "seq": (lambda v: v + 100, "chain"),
    "kind": (lambda v: "eval", "chain"),
    "step": (lambda v: v + 1, "chain"),
    "time_ns": (lambda v: v - 1, "chain"),
    "run_id": (lambda v: "someone-else", "chain"),
    "key_id": (lambda v: flip(v), "chain"),
    "hash": (lambda v: flip(v), "chain"),
    "metrics": (lambda v: [(k, x * 0.5) for k, x in v], "chain"),
    # one signed value repeated under one name in place of the others: the same count of entries
    "metrics-repeated-key": (lambda v: [v[0]] * len(v), "chain"),
    "record": (lambda v: flip(v), "chain"),
    "record-header": (lambda v: flip(v, 15), "chain"),
    "signature": (lambda v: flip(v), "signatures"),
}


@pytest.mark.parametrize("cell", sorted(CELL_CHANGES))
def test_changing_any_one_cell_is_caught(book, capsys, cell):
    path, pub = book
    column = cell.split("-")[0]
    change, check = CELL_CHANGES[cell]
    rewrite(path / "parts" / "000000.parquet",
            lambda t: set_cell(t, column, ROW, change(t[column][ROW].as_py())))
    code, report = run(capsys, path, "--key", pub)
    assert code == 1 and report["verdict"] == "fail"
    failed = [name for name, c in report["checks"].items() if c["status"] == "fail"]
    assert check in failed
    assert report["checks"][check]["first_bad_seq"] == ROW
    assert f"seq {ROW}" in report["checks"][check]["detail"]


def test_delete_interior_row(book, capsys):
    path, pub = book
    rewrite(path / "parts" / "000000.parquet", lambda t: pa.concat_tables([t.slice(0, ROW), t.slice(ROW + 1)]))
    code, report = run(capsys, path, "--key", pub)
    assert code == 1 and report["checks"]["chain"]["status"] == "fail"
    assert report["checks"]["chain"]["first_bad_seq"] == ROW
    assert "not contiguous" in report["checks"]["chain"]["detail"]


def test_reorder_rows(book, capsys):
    path, pub = book
    rewrite(path / "parts" / "000000.parquet",
            lambda t: t.take([*range(ROW), ROW + 1, ROW, *range(ROW + 2, t.num_rows)]))
    code, report = run(capsys, path, "--key", pub)
    assert code == 1 and report["checks"]["chain"]["first_bad_seq"] == ROW


def test_swap_in_a_part_from_another_run(book, capsys, signer, tmp_path):
    path, pub = book
    other = write_ledger(tmp_path / "other", signer, 25, rollover=10, run_id="another-run")
    shutil.copy(other / "parts" / "000001.parquet", path / "parts" / "000001.parquet")
    code, report = run(capsys, path, "--key", pub)
    chain = report["checks"]["chain"]
    assert code == 1 and chain["status"] == "fail" and chain["first_bad_seq"] == 10
    assert "another run" in chain["detail"] or "prev_hash" in chain["detail"]
    assert report["checks"]["signatures"]["status"] == "pass"  # same signer: only the chain can tell


def test_truncated_part(book, capsys):
    path, pub = book
    part = path / "parts" / "000001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    code, report = run(capsys, path, "--key", pub)
    chain = report["checks"]["chain"]
    assert code == 1 and chain["status"] == "fail"
    assert "000001.parquet" in chain["detail"] and chain["first_bad_seq"] == 10


def test_wrong_public_key(book, capsys, tmp_path):
    path, _ = book
    wrong = tmp_path / "wrong.pub"
    wrong.write_bytes(public_key_pem(Signer.from_seed(b"\x05" * 32).public.raw))
    code, report = run(capsys, path, "--key", wrong)
    sig = report["checks"]["signatures"]
    assert code == 1 and sig["status"] == "fail" and sig["first_bad_seq"] == 0
    assert "not" in sig["detail"] and sig["bad_signatures"] == 27
    assert report["checks"]["chain"]["status"] == "pass"


def test_ledger_re_signed_by_someone_else(tmp_path, capsys, signer):
    """A forger re-creates the whole ledger with their own key: self-consistent, but not the trainer's."""
    forged = write_ledger(tmp_path / "forged", Signer.from_seed(b"\x09" * 32), 12)
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(signer.public.raw))
    code, report = run(capsys, forged)
    assert code == 0 and report["checks"]["signatures"]["status"] == "warn"
    assert "signer not authenticated" in report["checks"]["signatures"]["detail"]
    code, report = run(capsys, forged, "--key", pub)
    assert code == 1 and report["checks"]["signatures"]["status"] == "fail"


@pytest.mark.parametrize("cut", ["last-part", "seal-row"])
def test_clean_prefix_is_a_valid_unsealed_ledger(book, capsys, cut):
    path, pub = book
    last = path / "parts" / "000002.parquet"
    if cut == "last-part":
        last.unlink()
    else:
        rewrite(last, lambda t: t.slice(0, t.num_rows - 1))
    # the final signed head beside the ledger still states the whole ledger: the cut is caught
    code, report = run(capsys, path, "--key", pub)
    assert code == 1 and report["checks"]["heads"]["status"] == "fail" and "cut short" in \
        report["checks"]["heads"]["detail"]
    for final in (path / "heads").glob("*.note"):  # a cutter who also removes that head
        final.unlink()
    code, report = run(capsys, path, "--key", pub)
    assert code == 0 and report["verdict"] == "pass"
    assert report["checks"]["seal"]["status"] == "warn" and report["ledger"]["sealed"] is False
    assert {"check": "seal", "status": "warn"}.items() <= report["not_shown"][0].items()
    assert "manifest.json" in report["checks"]["seal"]["detail"]  # the (untrusted) manifest hints at more
    code, report = run(capsys, path, "--key", pub, "--require", "seal")
    assert code == 1 and report["checks"]["seal"]["status"] == "fail"


def test_sample_mode_checks_every_hash_but_only_sampled_signatures(book, capsys):
    path, pub = book
    code, report = run(capsys, path, "--key", pub, "--sample", "3", "--sample-seed", "1")
    assert code == 0 and report["checks"]["signatures"]["status"] == "warn"
    assert report["checks"]["signatures"]["checked"] <= 5 and report["ledger"]["sample"]["seed"] == 1
    # a flipped record byte is still caught: every hash is recomputed even in sample mode
    rewrite(path / "parts" / "000001.parquet", lambda t: set_cell(t, "record", 3, flip(t["record"][3].as_py())))
    code, report = run(capsys, path, "--key", pub, "--sample", "3")
    assert code == 1 and report["checks"]["chain"]["first_bad_seq"] == 13


def test_bodies_after_a_broken_link_are_not_decoded(book, capsys):
    """Past the first broken link the chain has failed: the bodies that follow are not decoded
    (they cannot change the verdict), and the report still names the first bad seq."""
    path, pub = book
    rewrite(path / "parts" / "000000.parquet",
            lambda t: set_cell(t, "record", ROW, t["record"][ROW].as_py()[:60] + bytes(32)
                               + t["record"][ROW].as_py()[92:]))  # prev_hash zeroed
    code, report = run(capsys, path, "--key", pub)
    chain = report["checks"]["chain"]
    assert code == 1 and chain["first_bad_seq"] == ROW
    assert chain["bodies_decoded"] == ROW + 1 and chain["bodies_not_decoded"] == 27 - ROW - 1
    assert set(report["checks"]) >= {"seal", "signatures"}
