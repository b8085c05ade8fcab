"""The `ledger` command on hostile but genuinely signed ledgers and awkward paths: wide metric maps,
odd genesis field types, report paths inside the evidence, undecodable and multi-line path names,
files written beside the report. Real ledgers on disk, the real CLI as a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from conftest import fixed_clock, write_ledger

import ledger
from ledger import LedgerWriter, Signer
from ledger._encoding import encode_body
from ledger._entry import Entry
from ledger._parts import entries_table, list_parts, write_part
from ledger._record import Header, Kind, encode_record, entry_hash, merkle_root

SIGNER = Signer.from_seed(bytes(range(32)))
STRICT = {"PYTHONIOENCODING": "utf-8:strict"}


def cli(*args: str | bytes | os.PathLike, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI as a subprocess; arguments may be bytes (undecodable file names), output is bytes."""
    argv = [a if isinstance(a, bytes) else os.fsencode(a) for a in args]
    return subprocess.run([sys.executable, "-m", "ledger", *argv], capture_output=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def snapshot(root: Path) -> dict[str, Any]:
    """Every file's bytes (hashed), mode and mtime under ``root``."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
            state[str(path)] = (info.st_mode, info.st_mtime_ns, digest)
    return state


@pytest.fixture
def sealed(tmp_path: Path) -> Path:
    return write_ledger(tmp_path / "L", SIGNER, 6)


# ----------------------------------------------------------------------------- wide metric maps
def many_names(path: Path, steps: int, body: Callable[[int], dict[str, float]]) -> Path:
    writer = LedgerWriter.create(path, SIGNER, genesis={}, clock=fixed_clock())
    for i in range(steps):
        writer.append("step", i, {"metrics": body(i)})
    writer.close()
    return path


# A small launcher forks the CLI and reports its peak RSS: a child forked straight from the test
# process would start with that process's resident set, and ru_maxrss would count it.
LAUNCH = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "ledger", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(*args: str | os.PathLike, tmp: Path) -> tuple[int, bytes, bytes, int]:
    """Run the CLI; (exit code, stdout, stderr, peak RSS of that process in MiB)."""
    with open(tmp / "out", "wb") as out, open(tmp / "err", "wb") as err:
        code = subprocess.run([sys.executable, "-c", LAUNCH, str(tmp / "rss"), *map(str, args)], stdout=out,
                              stderr=err).returncode
    return code, (tmp / "out").read_bytes(), (tmp / "err").read_bytes(), int((tmp / "rss").read_text()) // 1024


@pytest.mark.slow
def test_one_new_metric_name_per_step_stays_linear(tmp_path):
    """20 000 steps, each logging a differently named metric: the wide frame (entries × names)
    needed 3 GiB and exited 3 with MemoryError; info now counts names from the flattened maps and
    log keeps 256 columns."""
    path = many_names(tmp_path / "L", 20_000, lambda i: {f"m{i}": 1.0})
    rc, out, err, rss = run_measured("info", path, "--json", tmp=tmp_path)
    facts = json.loads(out)
    assert rc == 0 and facts["entries"] == 20_001 and len(facts["metrics"]) == 256, err
    assert facts["metrics"][:2] == ["m0", "m1"] and facts["metrics_omitted"] == 20_000 - 256
    assert err.decode().splitlines() == [f"ledger: note: {20_000 - 256} more metric names not listed (at most 256, "
                                         "the most often logged)"]
    assert rss < 700, rss
    rc, out, err, rss = run_measured("log", path, "--format", "csv", tmp=tmp_path)
    lines = out.decode().splitlines()
    assert rc == 0 and len(lines) == 20_002 and lines[0].count(",") == 5 + 256 - 1, err
    assert f"{20_000 - 256} more metric names not shown" in err.decode() and rss < 700, rss


def test_metric_columns_are_capped_keeping_the_most_logged(tmp_path):
    path = many_names(tmp_path / "L", 300, lambda i: {"loss": 1 / (i + 1), f"m{i}": float(i)})
    out = cli("log", path, "--format", "csv")
    header = out.stdout.decode().splitlines()[0].split(",")
    assert out.returncode == 0 and header[:7] == ["seq", "kind", "step", "time", "hash", "loss", "m0"]
    assert len(header) == 5 + 256 and header[-1] == "m254" and "m255" not in header
    assert out.stderr.decode().strip() == ("ledger: note: 45 more metric names not shown (at most 256 metric columns, "
                                           "the most often logged)")
    info = cli("info", path, "--json")
    facts = json.loads(info.stdout)
    assert facts["metrics"] == header[5:] and facts["metrics_omitted"] == 45 and info.returncode == 0
    frame = ledger.open(path).to_pandas()
    assert frame.attrs["metrics_omitted"] == 45 and frame["m3"].count() == 1 and frame["m3"].iloc[4] == 3.0
    assert ledger.open(path).to_pandas(max_metrics=None).shape == (301, 5 + 301)
    assert "256" in cli("log", "--help").stdout.decode()


def test_metric_columns_are_the_frame_of_the_metric_maps(tmp_path):
    """Built from the flattened maps, the frame is what one dict per entry gave: names in order of
    first appearance, NaN where not logged, a name equal to a fixed column left out."""
    import numpy as np
    import pandas as pd

    def body(i: int) -> dict[str, float]:
        return [{"b": float(i)}, {"a": 1.0, "seq": 5.0, "b": 2.0}, {}, {"c": float("nan"), "a": -1e300}][i % 4]

    path = many_names(tmp_path / "L", 13, body)
    reader = ledger.open(path)
    frame = reader.to_pandas()
    table = reader.table()
    expected = pd.DataFrame([dict(m) for m in table["metrics"].to_pylist()]).drop(columns=["seq"])
    assert list(frame.columns) == ["seq", "kind", "step", "time", "hash", "b", "a", "c"] and not frame.attrs
    pd.testing.assert_frame_equal(frame[["b", "a", "c"]], expected[["b", "a", "c"]], check_exact=True)
    assert np.isnan(frame["a"].iloc[0]) and frame["a"].iloc[4] == -1e300


# ----------------------------------------------------------------------------- odd genesis types
def resigned(src: Path, dst: Path, genesis_change: dict[str, Any]) -> Path:
    """A copy of ``src`` (one part) whose genesis is changed and every entry re-signed with the
    trainer's key: chain, signatures and seal hold."""
    reader = ledger.open(src)
    entries, run_id = list(reader.entries()), reader.run_id
    prev, hashes, out, metrics = bytes(32), [], [], []
    for entry in entries:
        header, body = entry.header, entry.body()
        if header.kind is Kind.GENESIS:
            body = {**body, **genesis_change}
        if header.kind is Kind.SEAL:
            body = {**body, "entry_count": len(hashes), "head": prev, "tree_root": merkle_root(hashes)}
        try:
            raw = encode_body(body)
        except ledger.ConfigurationError:
            raw = cbor2.dumps(body, canonical=True)
        record = encode_record(Header(1, header.kind, header.seq, header.step, header.time_ns, header.run_digest,
                                      prev), raw)
        out.append(Entry(record=record, signature=SIGNER.sign(record), key_id=SIGNER.public.key_id))
        prev = entry_hash(record)
        hashes.append(prev)
        metrics.append(dict(body.get("metrics", {})))
    (dst / "parts").mkdir(parents=True)
    (dst / "wal.log").write_bytes((src / "wal.log").read_bytes())
    write_part(dst / "parts" / "000000.parquet", entries_table(out, run_id, metrics), run_id)
    return dst


@pytest.mark.parametrize("field, value, shown", [
    ("created_ns", "x", None), ("created_ns", 10**30, None), ("created_ns", 1e300, None),
    ("created_ns", float("nan"), None), ("format", b"\x01", "b'\\x01'"), ("run_id", b"r", "b'r'"),
    ("run_id", {"a": [1, 2]}, "{'a': [1, 2]}"),
])
def test_info_reads_a_genesis_with_odd_field_types(sealed, tmp_path, field, value, shown):
    assert len(list_parts(sealed / "parts")) == 1
    path = resigned(sealed, tmp_path / "R", {field: value})
    out = cli("info", path, "--json")
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["created" if field == "created_ns" else field] == shown and facts["entries"] == 8
    text = cli("info", path, env=STRICT)
    assert text.returncode == 0 and b"genesis_fields" in text.stdout, text.stderr


# ----------------------------------------------------------------------------- report paths
@pytest.mark.parametrize("target", ["L/wal.log", "L/parts/000000.parquet", "L/parts/000001.parquet",
                                    "L/new/x.html", "C/r.html", "trainer.pub", "link.html"])
def test_report_is_refused_inside_the_ledger_or_checkpoints_or_over_an_input(sealed, tmp_path, target):
    (tmp_path / "C").mkdir()
    (tmp_path / "trainer.pub").write_bytes(ledger._crypto.public_key_pem(SIGNER.public.raw))
    (tmp_path / "link.html").symlink_to(sealed / "wal.log")
    before = snapshot(tmp_path)
    out = cli("verify", sealed, "--checkpoints", tmp_path / "C", "--key", tmp_path / "trainer.pub",
              "--report", tmp_path / target)
    assert out.returncode == 2, out
    assert len(out.stderr.splitlines()) == 1 and b"write the report elsewhere" in out.stderr
    assert snapshot(tmp_path) == before


def test_report_is_refused_over_the_recipe_and_inside_the_recorded_checkpoint_dir(tmp_path):
    """The recipe file is an input too, and without --checkpoints the checkpoints are where genesis
    says (here a user checkpoint_dir outside the ledger)."""
    stored = Path(__file__).parent / "data" / "stored-run"
    recipe = tmp_path / "myrecipe.py"
    recipe.write_text("RECIPE = None\n")
    before = snapshot(tmp_path)
    out = cli("verify", stored / "ledger", "--recipe", f"{recipe}:RECIPE", "--report", recipe)
    assert out.returncode == 2 and b"is the input file" in out.stderr, out.stderr
    assert snapshot(tmp_path) == before
    path = resigned(write_ledger(tmp_path / "S", SIGNER, 3), tmp_path / "G", {"checkpoint_dir": str(tmp_path / "CK")})
    (tmp_path / "CK").mkdir()
    out = cli("verify", path, "--report", tmp_path / "CK" / "r.html")
    assert out.returncode == 2 and b"inside the checkpoint directory" in out.stderr, out.stderr
    assert not (tmp_path / "CK" / "r.html").exists()


def test_report_is_written_through_a_temporary_file(sealed, tmp_path, monkeypatch, capsys):
    from ledger import _cli

    target = tmp_path / "out" / "r.html"
    out = cli("verify", sealed, "--report", target)
    assert out.returncode == 0 and target.read_bytes().startswith(b"<!DOCTYPE html>"), out.stderr
    assert os.listdir(target.parent) == ["r.html"]
    target.write_text("old report")

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_cli.os, "replace", refuse)
    with pytest.raises(SystemExit) as exc:
        _cli.main(["verify", str(sealed), "--report", str(target)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cannot write the report" in err and "No space left" in err
    assert os.listdir(target.parent) == ["r.html"] and target.read_text() == "old report"


def test_report_writes_nothing_else(sealed, tmp_path):
    """matplotlib's font cache and config go to a temporary directory, removed afterwards."""
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MPL"))}
    env.update(HOME=str(home), TMPDIR=str(scratch))
    out = subprocess.run([sys.executable, "-m", "ledger", "verify", str(sealed), "--report", str(tmp_path / "r.html")],
                         capture_output=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r.html").stat().st_size > 10_000
    assert os.listdir(home) == [] and os.listdir(scratch) == []


# ----------------------------------------------------------------------------- awkward names
def test_undecodable_path_is_printed_escaped_on_a_strict_stream(sealed, tmp_path):
    odd = os.fsencode(tmp_path) + b"/r\xff"
    os.mkdir(odd)
    os.rename(sealed, odd + b"/L")
    path = odd + b"/L"
    shown = os.fsencode(tmp_path) + b"/r\\xff/L"
    verify = cli("verify", path, env=STRICT)
    assert verify.returncode == 0 and verify.stdout.startswith(b"ledger " + shown + b"  run "), verify.stderr
    info = cli("info", path, env=STRICT)
    assert info.returncode == 0 and b"path: " + shown in info.stdout, info.stderr
    assert cli("log", path, env=STRICT).returncode == 0
    report = odd + b"/r\xff.html"
    out = cli("verify", path, "--report", report, env=STRICT)
    assert out.returncode == 0 and out.stderr.startswith(b"report written to " + odd.replace(b"\xff", b"\\xff")), out
    page = Path(os.fsdecode(report)).read_bytes()
    assert page.decode("utf-8").count("r\\xff/L") >= 2 and page.endswith(b"</html>\n")
    missing = cli("verify", odd + b"/missing", env=STRICT)
    assert missing.returncode == 2 and missing.stderr.count(b"\n") == 1 and b"r\\xff/missing" in missing.stderr


def test_a_newline_in_a_path_stays_on_one_line(sealed, tmp_path):
    out = cli("verify", tmp_path / "no\nsuch")
    assert out.returncode == 2 and out.stderr.count(b"\n") == 1 and b"no\\nsuch does not exist" in out.stderr
    out = cli("verify", sealed, "--key", tmp_path / "k\x1b[2J.pub")
    assert out.returncode == 2 and out.stderr.count(b"\n") == 1 and b"k\\x1b[2J.pub" in out.stderr
    odd = sealed.rename(tmp_path / "L\nx")
    out = cli("verify", odd)
    lines = out.stdout.decode().splitlines()
    assert out.returncode == 0 and lines[0].startswith(f"ledger {tmp_path}/L\\nx  run ")
    assert lines[-1].startswith("PASS") and all(line.startswith("  ") for line in lines[1:-1])


def test_part_names_need_ascii_digits(sealed):
    parts = sealed / "parts"
    first = sorted(parts.iterdir())[0]
    (parts / "\u0660\u0660\u0660\u0660\u0660\u0661.parquet").write_bytes(first.read_bytes())
    assert [p.name for p in list_parts(parts)] == sorted(p.name for p in parts.iterdir() if p.name.isascii())
    out = cli("verify", sealed)
    assert out.returncode == 0, out.stdout


def test_a_report_path_through_a_symlink_loop_is_one_line(sealed, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    out = cli("verify", sealed, "--report", tmp_path / "a" / "r.html")
    assert out.returncode == 2 and out.stderr.count(b"\n") == 1 and b"cannot resolve the --report path" in out.stderr
