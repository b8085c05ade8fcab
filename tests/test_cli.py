"""The `ledger` command as users run it: real subprocesses for exit codes and messages."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_ledger

from ledger._crypto import public_key_pem


def ledger_cli(*args, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ledger", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=stdin, timeout=120)


def test_keygen_writes_a_private_key_0600_and_refuses_to_overwrite(tmp_path):
    out = ledger_cli("keygen", tmp_path / "k" / "trainer")
    assert out.returncode == 0, out.stderr
    private, public = tmp_path / "k" / "trainer.pem", tmp_path / "k" / "trainer.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and b"PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes()
    again = ledger_cli("keygen", tmp_path / "k" / "trainer")
    assert again.returncode == 2 and "already exists" in again.stderr and private.read_bytes() == before
    assert "Traceback" not in again.stderr


def test_encrypted_key_needs_its_passphrase(tmp_path):
    import ledger

    out = ledger_cli("keygen", tmp_path / "enc", "--passphrase-env", "PW", env={"PW": "s3cret"})
    assert out.returncode == 0 and b"ENCRYPTED" in (tmp_path / "enc.pem").read_bytes()
    with pytest.raises(ledger.KeyLoadError, match="encrypted; give its passphrase"):
        ledger.load_signer(tmp_path / "enc.pem")
    with pytest.raises(ledger.KeyLoadError, match="wrong passphrase"):
        ledger.load_signer(tmp_path / "enc.pem", b"nope")
    assert ledger.load_signer(tmp_path / "enc.pem", b"s3cret").public.raw
    os.environ["LEDGER_KEY_PASSPHRASE"] = "s3cret"
    try:
        ledger.LedgerWriter.create(tmp_path / "L", tmp_path / "enc.pem").close()
    finally:
        del os.environ["LEDGER_KEY_PASSPHRASE"]


def test_key_errors_are_one_clear_line(tmp_path, keys):
    import ledger

    rsa_pem = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
                             capture_output=True).stdout if _has_openssl() else b""
    cases = [(tmp_path / "missing.pem", "does not exist"), (tmp_path, "is a directory")]
    (tmp_path / "garbage.pem").write_text("hello")
    cases.append((tmp_path / "garbage.pem", "not a PEM private key"))
    if rsa_pem:
        (tmp_path / "rsa.pem").write_bytes(rsa_pem)
        cases.append((tmp_path / "rsa.pem", "not an Ed25519 key"))
    for path, message in cases:
        with pytest.raises(ledger.KeyLoadError, match=message):
            ledger.load_signer(path)
    with pytest.raises(ledger.KeyLoadError, match="is a private key"):
        ledger.load_public_key(keys[0])


def _has_openssl() -> bool:
    from shutil import which

    return which("openssl") is not None


def test_missing_key_is_never_regenerated(tmp_path):
    import ledger

    with pytest.raises(ledger.KeyLoadError):
        ledger.LedgerWriter.create(tmp_path / "L", tmp_path / "nokey.pem")
    assert not (tmp_path / "nokey.pem").exists() and not (tmp_path / "L").exists()


@pytest.fixture
def sealed(tmp_path, signer) -> tuple[Path, Path]:
    path = write_ledger(tmp_path / "L", signer, 15, rollover=6)
    pub = tmp_path / "trainer.pub"
    pub.write_bytes(public_key_pem(signer.public.raw))
    return path, pub


def test_verify_pass_text_and_json(sealed):
    path, pub = sealed
    out = ledger_cli("verify", path, "--key", pub)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("PASS: chain, signatures, seal and heads hold for 17 "
                                                                "entries")
    out = ledger_cli("verify", path, "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["verdict"] == "pass" and report["rests_on"] == ["chain", "seal"]
    assert report["not_shown"][0]["reason"].startswith("self-consistent, signer not authenticated")
    assert set(report["ledger"]) >= {"run_id", "entries", "steps", "sealed", "head", "key_id"}
    assert report["ledger"]["steps"] == 15 and report["ledger"]["entries"] == 17


def test_verify_fail_exit_1_names_the_entry(sealed):
    import pyarrow.parquet as pq

    path, pub = sealed
    part = path / "parts" / "000001.parquet"
    table = pq.read_table(part)
    table.to_pandas()  # readable
    import pyarrow as pa

    rows = [i for i in range(table.num_rows) if i != 2]
    pq.write_table(table.take(pa.array(rows)), part)
    out = ledger_cli("verify", path, "--key", pub)
    assert out.returncode == 1
    assert "chain        fail  first bad entry seq 8" in out.stdout and out.stdout.strip().startswith("ledger ")
    assert out.stdout.strip().splitlines()[-1].startswith("FAIL: chain, seal and heads failed")


@pytest.mark.parametrize("args, message", [
    (["verify", "{tmp}/missing"], "does not exist"),
    (["verify", "{tmp}/file.txt"], "is a file, not a ledger directory"),
    (["verify", "{tmp}/emptydir"], "is not a ledger"),
    (["verify", "{ledger}", "--key", "{tmp}/nokey.pub"], "does not exist"),
    (["verify", "{ledger}", "--key", "{tmp}/file.txt"], "not a PEM public key"),
    (["verify", "{ledger}", "--require", "bogus"], "unknown check"),
    (["verify", "{ledger}", "--sample", "-1"], "Invalid value"),
    (["info", "{tmp}/missing"], "does not exist"),
    (["log", "{tmp}/emptydir"], "is not a ledger"),
    (["nosuchcommand"], "No such command"),
])
def test_could_not_run_is_exit_2_with_one_line(sealed, tmp_path, args, message):
    (tmp_path / "file.txt").write_text("not a ledger")
    (tmp_path / "emptydir").mkdir(exist_ok=True)
    argv = [a.format(tmp=tmp_path, ledger=sealed[0]) for a in args]
    out = ledger_cli(*argv)
    assert out.returncode == 2, out
    assert message in out.stderr and "Traceback" not in out.stderr
    if argv[0] in ("verify", "info", "log"):
        assert len(out.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    out = ledger_cli("--debug", "verify", tmp_path / "missing")
    assert out.returncode == 2 and "Traceback" in out.stderr and "does not exist" in out.stderr


def test_info_and_log(sealed):
    path, _ = sealed
    info = json.loads(ledger_cli("info", path, "--json").stdout)
    assert info["entries"] == 17 and info["sealed"] and info["steps"] == [0, 14] and info["parts"] == 3
    assert "loss" in info["metrics"] and info["kinds"] == {"genesis": 1, "seal": 1, "step": 15}
    text = ledger_cli("info", path).stdout
    assert "run_id" in text and "sealed: True" in text
    csv = ledger_cli("log", path, "--format", "csv").stdout.splitlines()
    assert csv[0].startswith("seq,kind,step,time,hash") and "loss" in csv[0] and len(csv) == 18
    rows = json.loads(ledger_cli("log", path, "--format", "json", "--kind", "step", "--tail", "2").stdout)
    assert [r["step"] for r in rows] == [13, 14] and rows[0]["loss"] == pytest.approx(1 / 14)
    table = ledger_cli("log", path).stdout
    assert "genesis" in table and "seal" in table


def test_internal_error_is_exit_3(monkeypatch, capsys, sealed):
    from ledger import _cli

    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(_cli, "ledger_info", boom)
    with pytest.raises(SystemExit) as exc:
        _cli.main(["info", str(sealed[0])])
    assert exc.value.code == 3 and "internal error: RuntimeError: bug" in capsys.readouterr().err
