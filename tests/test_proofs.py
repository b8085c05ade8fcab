"""``ledger prove``, ``ledger verify-proof`` and ``ledger consistency`` through the real CLI, on
ledgers written by the real writer: proofs that hold, forged entries and heads, forks, ledgers
cut short, and hostile proof files (docs/FORMAT.md §13.3)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXED_SEED, fixed_clock
from test_heads import write_run as heads_run

import ledger._cli_proofs
from ledger import LedgerWriter, Signer
from ledger._cli import main
from ledger._crypto import public_key_pem
from ledger._heads import list_heads

SIGNER = Signer.from_seed(FIXED_SEED)
DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def write_run(path: Path, *, steps: int = 12, checkpoints: tuple[int, ...] = (4,), seal: bool = True,
              run_id: str = "proof-run", signer: Signer = SIGNER, heads: bool = True) -> Path:
    """test_heads' ledger with this file's defaults: 12 steps, one checkpoint after step 4."""
    return heads_run(path, steps=steps, checkpoints=checkpoints, seal=seal, run_id=run_id, signer=signer,
                     heads=heads)


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def pub(tmp_path) -> Path:
    path = tmp_path / "trainer.pub"
    path.write_bytes(public_key_pem(SIGNER.public.raw))
    return path


@pytest.fixture
def sealed(tmp_path) -> Path:
    return write_run(tmp_path / "L")


def edit(proof: Path, change) -> Path:
    obj = json.loads(proof.read_text())
    change(obj)
    out = proof.with_name("edited.json")
    out.write_text(json.dumps(obj))
    return out


def b64_flip(text: str, at: int = -1) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[at] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def test_prove_and_verify_entries_of_a_sealed_ledger(capsys, sealed, pub, tmp_path):
    code, out, _ = cli(capsys, "prove", sealed, "--seq", 3, "--seq", 9, "--out", tmp_path / "p.json")
    assert code == 0 and "2 entries in the signed head of 15 entries" in out  # the final head: seal included
    code, out, _ = cli(capsys, "verify-proof", tmp_path / "p.json", "--key", pub)
    assert code == 0 and "PASS: 2 entries are in the signed tree head of 15 entries of run 'proof-run'" in out
    assert "seq 3: step at step 2: " in out and "loss=0.3333333333333333" in out and "seq 9: step at step 7" in out
    code, out, _ = cli(capsys, "verify-proof", tmp_path / "p.json", "--key", pub, "--json")
    report = json.loads(out)
    assert code == 0 and [e["seq"] for e in report["entries"]] == [3, 9] and report["head"]["size"] == 15
    assert report["entries"][0]["metrics"]["loss"] == 1 / 3


def test_forged_proofs_fail_naming_the_entry(capsys, sealed, pub, tmp_path):
    cli(capsys, "prove", sealed, "--seq", 3, "--out", tmp_path / "p.json")
    proof = tmp_path / "p.json"
    cases = {
        "signature does not verify": lambda o: o["entries"][0].update(record=b64_flip(o["entries"][0]["record"])),
        "audit path does not lead":
            lambda o: o["entries"][0]["path"].__setitem__(0, b64_flip(o["entries"][0]["path"][0])),
        "the record is entry 3 of this run": lambda o: o["entries"][0].update(seq=4),
        "is not signed by the given key": lambda o: o.update(head=o["head"].replace("\n15\n", "\n16\n")),
        "not of run": lambda o: o.update(run_id="other"),
    }
    for expected, change in cases.items():
        code, out, _ = cli(capsys, "verify-proof", edit(proof, change), "--key", pub)
        assert code == 1 and expected in out and out.strip().splitlines()[-1].startswith("FAIL:"), expected
    other = tmp_path / "other.pub"
    other.write_bytes(public_key_pem(Signer.from_seed(bytes(32)).public.raw))
    code, out, _ = cli(capsys, "verify-proof", proof, "--key", other)
    assert code == 1 and "not signed by the given key" in out


def test_an_entry_of_another_run_under_the_same_key_fails(capsys, tmp_path, pub):
    ours = write_run(tmp_path / "ours")
    theirs = write_run(tmp_path / "theirs", run_id="another-run")
    cli(capsys, "prove", ours, "--seq", 3, "--out", tmp_path / "ours.json")
    cli(capsys, "prove", theirs, "--seq", 3, "--out", tmp_path / "theirs.json")
    foreign = json.loads((tmp_path / "theirs.json").read_text())["entries"][0]
    spliced = edit(tmp_path / "ours.json", lambda o: o["entries"].__setitem__(0, foreign))
    code, out, _ = cli(capsys, "verify-proof", spliced, "--key", pub)
    assert code == 1 and "seq 3: the record is entry 3 of another run" in out


def test_an_open_ledger_proves_against_its_newest_checkpoint_head(capsys, tmp_path, pub):
    path = write_run(tmp_path / "L", checkpoints=(2, 6), seal=False)
    code, out, _ = cli(capsys, "prove", path, "--seq", 5, "--out", tmp_path / "p.json")
    assert code == 0 and "signed head of 9 entries" in out  # the checkpoint at seq 9 signs entries 0…8
    assert cli(capsys, "verify-proof", tmp_path / "p.json", "--key", pub)[0] == 0
    code, _, err = cli(capsys, "prove", path, "--seq", 12, "--out", tmp_path / "q.json")
    assert code == 2 and "no signed tree head covers seq 12: the newest covers seq 0 to 8 (the next comes with the " \
        "next checkpoint" in err
    code, _, err = cli(capsys, "prove", path, "--seq", 99, "--out", tmp_path / "q.json")
    assert code == 2 and "seq 99 is not in the ledger" in err
    old = write_run(tmp_path / "old", heads=False)
    code, _, err = cli(capsys, "prove", old, "--seq", 1, "--out", tmp_path / "q.json")
    assert code == 2 and "holds no signed tree heads" in err and not (tmp_path / "q.json").exists()


def test_consistency_of_a_later_ledger_with_a_posted_head(capsys, tmp_path, pub):
    path = write_run(tmp_path / "L", checkpoints=(2, 6))
    posted = tmp_path / "posted.note"
    posted.write_bytes(dict(list_heads(path))[4])  # the head a lab posted at the first checkpoint
    code, out, _ = cli(capsys, "consistency", posted, path, "--key", pub)
    assert code == 0 and "PASS: the ledger (16 entries) extends the signed head of 4 entries" in out
    code, out, _ = cli(capsys, "prove", path, "--consistency-from", posted, "--out", tmp_path / "c.json")
    assert code == 0 and "the head of 16 entries extends the head of 4" in out
    code, out, _ = cli(capsys, "verify-proof", tmp_path / "c.json", "--key", pub)
    assert code == 0 and "PASS: the signed tree head of 16 entries extends the signed head of 4" in out
    damaged = edit(tmp_path / "c.json", lambda o: o["path"].__setitem__(0, b64_flip(o["path"][0])))
    code, out, _ = cli(capsys, "verify-proof", damaged, "--key", pub)
    assert code == 1 and "not shown to extend the head of 4" in out


def test_forks_are_reported_as_forks(capsys, tmp_path, pub):
    ours = write_run(tmp_path / "ours", checkpoints=(2, 6))
    forked = write_run(tmp_path / "forked", checkpoints=(3, 6))  # same key and run id, another history
    ours_heads, forked_heads = dict(list_heads(ours)), dict(list_heads(forked))
    fork_note = tmp_path / "fork.note"
    fork_note.write_bytes(forked_heads[5])  # entries 0…4 differ from ours (a step where ours has a checkpoint)
    code, out, _ = cli(capsys, "consistency", fork_note, ours, "--key", pub)
    assert code == 1 and "FAIL: fork at size 5" in out
    code, out, _ = cli(capsys, "prove", ours, "--consistency-from", fork_note, "--out", tmp_path / "c.json")
    assert code == 1 and "fork at size 5" in out
    # two heads of one size, both signed by the key, different roots: a fork from the proof alone
    cli(capsys, "prove", forked, "--consistency-from", fork_note, "--out", tmp_path / "c.json")
    same_size = edit(tmp_path / "c.json", lambda o: o.update(old_head=ours_heads[16].decode(), path=[]))
    code, out, _ = cli(capsys, "verify-proof", same_size, "--key", pub)
    assert code == 1 and "FAIL: fork: fork at size 16" in out
    # a heads/ note by the key that the ledger does not extend: prove refuses
    (ours / "heads" / "5.note").write_bytes(forked_heads[5])
    code, out, _ = cli(capsys, "prove", ours, "--seq", 1, "--out", tmp_path / "p.json")
    assert code == 1 and "fork at size 5: the ledger does not extend the head signed in heads/5.note" in out
    # a posted head larger than the ledger: cut short
    short = write_run(tmp_path / "short", steps=3, checkpoints=(1,), seal=False)
    code, out, _ = cli(capsys, "consistency", ours / "heads" / "16.note", short, "--key", pub)
    assert code == 1 and "states 16 entries but the ledger holds 5: it was cut short, or forked" in out


HOSTILE = {
    "not json": b"{",
    "duplicate key": b'{"proof": "x", "proof": "y"}',
    "unknown kind": b'{"proof": "something"}',
    "nan": b'{"proof": "training-ledger/consistency-proof/v1", "run_id": NaN}',
    "list": b"[1, 2]",
    "not utf-8": b"\xff\xfe",
    "number of 5000 digits": b'{"proof": "training-ledger/consistency-proof/v1", "x": ' + b"9" * 5000 + b"}",
    "nested lists": b'{"proof": "x", "pad": [' + b"[]," * 400_000 + b"[]]}",
}


def test_hostile_proof_files_are_one_line_exit_2(capsys, sealed, pub, tmp_path, monkeypatch):
    cli(capsys, "prove", sealed, "--seq", 3, "--out", tmp_path / "p.json")
    good = json.loads((tmp_path / "p.json").read_text())
    cases = dict(HOSTILE)
    e0 = good["entries"][0]
    for name, entry in {"extra key": {**e0, "x": 1}, "bool seq": {**e0, "seq": True}, "negative seq": {**e0, "seq": -1},
                        "padding missing": {**e0, "signature": e0["signature"].rstrip("=")},
                        "short signature": {**e0, "signature": base64.b64encode(bytes(63)).decode()},
                        "long path": {**e0, "path": [e0["path"][0]] * 65},
                        "hash not 32 bytes": {**e0, "path": [base64.b64encode(bytes(31)).decode()]}}.items():
        cases[name] = json.dumps({**good, "entries": [entry]}).encode()
    cases["head not a note"] = json.dumps({**good, "head": "hello\n"}).encode()
    cases["lone surrogate head"] = json.dumps({**good, "head": "\ud800"}).encode()
    cases["lone surrogate run id"] = json.dumps({**good, "run_id": "proof-run\ud800"}).encode()
    cases["repeated seq"] = json.dumps({**good, "entries": [e0, e0, e0]}).encode()
    cases["huge seq"] = (tmp_path / "p.json").read_text().replace('"seq": 3', '"seq": ' + "1" * 5000).encode()
    cases["no entries"] = json.dumps({**good, "entries": []}).encode()
    for name, data in cases.items():
        target = tmp_path / "hostile.json"
        target.write_bytes(data)
        code, out, err = cli(capsys, "verify-proof", target, "--key", pub)
        assert code == 2 and err.count("\n") == 1 and err.startswith("ledger: error: "), (name, err)
    os.mkfifo(tmp_path / "fifo")
    for target in (tmp_path / "fifo", tmp_path, tmp_path / "absent.json"):
        code, _, err = cli(capsys, "verify-proof", target, "--key", pub)
        assert code == 2 and err.count("\n") == 1, target
    monkeypatch.setattr(ledger._cli_proofs, "MAX_PROOF_BYTES", 100)
    code, _, err = cli(capsys, "verify-proof", tmp_path / "p.json", "--key", pub)
    assert code == 2 and "more than the 100" in err


def test_the_console_script_end_to_end(tmp_path, pub):
    path = write_run(tmp_path / "L")
    run = [sys.executable, "-m", "ledger"]
    made = subprocess.run([*run, "prove", path, "--seq", "0", "--out", tmp_path / "p.json"], capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    checked = subprocess.run([*run, "verify-proof", tmp_path / "p.json", "--key", pub], capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode == 0 and "seq 0: genesis at step -1" in checked.stdout


def test_format_doc_proof_vector(capsys, tmp_path):
    """docs/FORMAT.md §13.3: the §8 vector chain (written by the real writer), proved at seq 1."""
    from test_vectors import build_vectors

    build_vectors(tmp_path / "V")
    cli(capsys, "prove", tmp_path / "V", "--seq", 1, "--out", tmp_path / "p.json")
    block = re.search(r"<!-- proof-vector:begin -->\n```json\n(.*?)```\n<!-- proof-vector:end -->", DOC.read_text(),
                      re.S)
    assert block is not None and block.group(1).encode() == (tmp_path / "p.json").read_bytes()


def test_a_structure_bomb_is_refused_before_parsing(monkeypatch):
    """64 MiB of nested empty lists took 1.78 GB to parse: the JSON structure is counted first, and
    the file size is bounded by what a proof of MAX_PROVED records can take."""
    import ledger._proofs as proofs
    from ledger.errors import FormatError

    assert proofs.MAX_PROOF_BYTES <= proofs.MAX_PROVED_BYTES * 4 // 3 + (32 << 20)
    monkeypatch.setattr(proofs.json, "loads", lambda *a, **k: pytest.fail("parsed a structure bomb"))
    with pytest.raises(FormatError, match="JSON lists, objects and items"):
        proofs.parse_proof(b'{"proof": "x", "pad": [' + b"[]," * (proofs.MAX_STRUCTURE // 2) + b"[]]}")


def test_verify_proof_pins_the_run_and_names_it(capsys, tmp_path, pub):
    """The key signs many runs: a proof of another run passes unless --run-id pins it; the verdict
    names the run either way."""
    write_run(tmp_path / "good", run_id="good-run")
    write_run(tmp_path / "look-alike", run_id="good-run\u2024v2")  # ONE DOT LEADER
    cli(capsys, "prove", tmp_path / "look-alike", "--seq", 3, "--out", tmp_path / "p.json")
    code, out, _ = cli(capsys, "verify-proof", tmp_path / "p.json", "--key", pub)
    assert code == 0 and "of run 'good-run\u2024v2'" in out.splitlines()[-1]
    code, out, _ = cli(capsys, "verify-proof", tmp_path / "p.json", "--key", pub, "--run-id", "good-run")
    assert code == 1 and out.strip().startswith("FAIL: the proof is of run") and "not of run 'good-run'" in out
    code, out, _ = cli(capsys, "verify-proof", tmp_path / "p.json", "--key", pub, "--run-id", "good-run\u2024v2")
    assert code == 0


def test_terminal_escapes_in_proved_entries_are_shown_escaped(capsys, tmp_path, pub):
    writer = LedgerWriter.create(tmp_path / "L", SIGNER, run_id="esc-run", clock=fixed_clock())
    writer.append("step", 0, {"\x1b[2K\rPASS: all good \x1b[8m": 1})
    writer.append("checkpoint", 0, {"path": "x"})
    writer.seal()
    cli(capsys, "prove", tmp_path / "L", "--seq", 1, "--seq", 2, "--out", tmp_path / "p.json")
    forged = edit(tmp_path / "p.json", lambda o: o["entries"][1].__setitem__("signature",
                                                                             b64_flip(o["entries"][1]["signature"], 0)))
    for proof, expected in ((tmp_path / "p.json", 0), (forged, 1)):
        code, out, _ = cli(capsys, "verify-proof", proof, "--key", pub)
        assert code == expected and "\x1b" not in out and "\r" not in out and "\\x1b[2K\\rPASS" in out, out
