"""Key files on a disk that refuses, and key paths that are not key files: one clear error, no partial key."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ledger
from ledger import ConfigurationError, KeyLoadError, StorageError
from ledger._cli import cli


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("fail_at", [1, 2])  # the private key's write, then the public key's
def test_keygen_on_a_full_disk_leaves_no_key(tmp_path, monkeypatch, fail_at):
    real, calls = os.write, []

    def full(fd, data):
        calls.append(len(data))
        if len(calls) >= fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match="No space left on device") as caught:
        ledger.generate_keypair(tmp_path / "keys" / "trainer")
    monkeypatch.undo()
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    assert _listing(tmp_path) == []  # no key, no temporary file, not even the keys/ it made
    private, public = ledger.generate_keypair(tmp_path / "keys" / "trainer")  # space is back
    ledger.load_signer(private)
    ledger.load_public_key(public)


def test_keygen_in_an_unwritable_place_leaves_nothing(tmp_path):
    if os.geteuid() == 0:  # modes do not stop root: a path under a regular file instead
        (tmp_path / "file").write_text("x")
        prefix, reason = tmp_path / "file" / "trainer", "Not a directory"
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        prefix, reason = tmp_path / "ro" / "trainer", "Permission denied"
    before = _listing(tmp_path)
    try:
        with pytest.raises(StorageError, match=reason):
            ledger.generate_keypair(prefix)
        result = CliRunner().invoke(cli, ["keygen", str(prefix)])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and reason in result.output
        assert _listing(tmp_path) == before
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o700)


def test_keygen_never_replaces_a_key(tmp_path):
    private, _ = ledger.generate_keypair(tmp_path / "k")
    data = private.read_bytes()
    with pytest.raises(ConfigurationError, match="already exists"):
        ledger.generate_keypair(tmp_path / "k")
    (tmp_path / "k.pub").unlink()
    with pytest.raises(ConfigurationError, match="already exists"):
        ledger.generate_keypair(tmp_path / "k")
    assert private.read_bytes() == data and not (tmp_path / "k.pub").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]


def test_keygen_encrypt_without_a_terminal_says_what_to_do(tmp_path):
    result = CliRunner().invoke(cli, ["keygen", str(tmp_path / "k"), "--encrypt"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--passphrase-env" in result.output and "LEDGER_KEY_PASSPHRASE" in result.output
    out = subprocess.run([sys.executable, "-m", "ledger", "keygen", str(tmp_path / "k"), "--encrypt"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--passphrase-env" in out.stderr
    assert list(tmp_path.iterdir()) == []
    env = {**os.environ, "LEDGER_KEY_PASSPHRASE": "correct horse"}
    out = subprocess.run([sys.executable, "-m", "ledger", "keygen", str(tmp_path / "k"), "--encrypt",
                          "--passphrase-env", "LEDGER_KEY_PASSPHRASE"], stdin=subprocess.DEVNULL, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ledger.load_signer(tmp_path / "k.pem", b"correct horse")


def test_key_paths_that_are_not_key_files_are_refused_before_reading(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.pem"
    big.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * (128 << 10))
    (tmp_path / "file").write_text("x")
    cases = [(fifo, "FIFO"), (big, "more than"), (tmp_path, "directory"), (tmp_path / "missing", "does not exist"),
             (tmp_path / "file" / "k.pem", "Not a directory"), (Path("/dev/zero"), "device")]
    for path, message in cases:
        for load in (ledger.load_signer, ledger.load_public_key):
            with pytest.raises(KeyLoadError, match=message):
                load(path)
