"""Signed tree heads in and beside a ledger (docs/FORMAT.md §13.2): the writer's ``tree_head`` on
checkpoint entries, ``heads/<size>.note`` files and ``on_head``; ``list_heads``; verify's ``heads``
check on real ledgers, forged and forked heads."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
from conftest import FIXED_SEED, fixed_clock, step_body

import ledger
from ledger import LedgerWriter, Signer
from ledger._heads import list_heads, write_head
from ledger._note import TreeHead, note_from_signature, open_note, origin_of, sign_note
from ledger._record import Kind, merkle_root
from ledger._schema import CheckpointBody, RecordedHead
from ledger.errors import FormatError

SIGNER = Signer.from_seed(FIXED_SEED)
DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def write_run(path: Path, *, checkpoints: tuple[int, ...] = (3, 7), steps: int = 10, seal: bool = True,
              on_head=None, signer: Signer = SIGNER, run_id: str = "run-heads", heads: bool = True) -> Path:
    """A ledger of ``steps`` step entries with a checkpoint entry after the given steps (``heads``
    False: written as a writer from before signed heads)."""
    writer = LedgerWriter.create(path, signer, run_id=run_id, clock=fixed_clock(), on_head=on_head)
    if not heads:
        writer._origin = None
    for i in range(steps):
        writer.append("step", i, step_body(i))
        if i in checkpoints:
            writer.append("checkpoint", i, {"path": f"checkpoints/{i}"})
    writer.seal() if seal else writer.close()
    return path


def test_checkpoint_entries_carry_the_signed_head_of_the_entries_before_them(tmp_path):
    seen: list[tuple[int, bytes]] = []
    path = write_run(tmp_path / "L", on_head=lambda size, note: seen.append((size, note)))
    entries = list(ledger.open(path).entries())
    hashes = [e.hash for e in entries]
    origin = origin_of("run-heads")
    checkpoint_sizes = []
    for entry in entries:
        if entry.kind is Kind.CHECKPOINT:
            head = RecordedHead.from_body(entry.body()["tree_head"])
            assert head is not None and head.size == entry.seq
            assert head.root == merkle_root(hashes[:entry.seq])
            note = note_from_signature(TreeHead(origin, head.size, head.root), SIGNER.public.raw, head.signature)
            assert open_note(note, SIGNER.public.raw) == (TreeHead(origin, entry.seq, head.root), True)
            checkpoint_sizes.append(entry.seq)
        else:
            assert "tree_head" not in entry.body()
    # heads/: every checkpoint head, then the final head of the whole ledger (seal included)
    heads = list_heads(path)
    assert [size for size, _ in heads] == [*checkpoint_sizes, len(entries)] == [size for size, _ in seen]
    assert [note for _, note in heads] == [note for _, note in seen]
    final, ok = open_note(heads[-1][1], SIGNER.public.raw)
    assert ok and final.root == merkle_root(hashes) and final.origin == origin
    assert not [p for p in (path / "heads").iterdir() if p.name.endswith(".tmp")]


def test_tree_head_is_the_writer_s_and_validated(tmp_path):
    writer = LedgerWriter.create(tmp_path / "L", SIGNER, run_id="r")
    entry = writer.append("checkpoint", 0, {"path": "x", "tree_head": {"size": 7}})  # a copied body's head
    writer.close()
    assert RecordedHead.from_body(entry.body()["tree_head"]).size == 1  # is the writer's own
    good = {"size": 3, "root": bytes(32), "signature": bytes(64)}
    assert RecordedHead.from_body(good) == RecordedHead(3, bytes(32), bytes(64))
    assert RecordedHead.from_body(None) is None
    for bad in ({**good, "signature": bytes(63)}, {**good, "root": b"x"}, {**good, "size": -1},
                {**good, "size": True}, {"root": bytes(32), "signature": bytes(64)}, [1, 2]):
        with pytest.raises(FormatError):
            RecordedHead.from_body(bad)


def test_a_reopened_writer_goes_on_publishing_heads(tmp_path):
    path = write_run(tmp_path / "L", checkpoints=(1,), steps=3, seal=False)
    writer = LedgerWriter.open(path, SIGNER)
    writer.append("checkpoint", 2, {"path": "c"})
    writer.seal()
    entries = list(ledger.open(path).entries())
    assert [size for size, _ in list_heads(path)] == [3, 5, len(entries)]
    assert open_note(list_heads(path)[1][1], SIGNER.public.raw)[0].root == merkle_root([e.hash for e in entries][:5])


def test_a_failing_on_head_warns_and_writing_goes_on(tmp_path):
    def boom(size: int, note: bytes) -> None:
        raise RuntimeError("publisher down")

    with pytest.warns(RuntimeWarning, match="publisher down"):
        path = write_run(tmp_path / "L", checkpoints=(1,), steps=3, on_head=boom)
    assert ledger.open(path).last_entry().kind is Kind.SEAL and len(list_heads(path)) == 2


def test_write_head_never_rewrites_and_list_heads_is_bounded(tmp_path):
    head = TreeHead("o", 5, bytes(32))
    note = sign_note(head, SIGNER)
    assert write_head(tmp_path, 5, note) is True
    assert write_head(tmp_path, 5, note) is False  # the same bytes: nothing to do
    with pytest.raises(FormatError, match="fork"):
        write_head(tmp_path, 5, sign_note(TreeHead("o", 5, bytes([1]) * 32), SIGNER))
    assert (tmp_path / "heads" / "5.note").read_bytes() == note
    write_head(tmp_path, 10, sign_note(TreeHead("o", 10, bytes(32)), SIGNER))
    (tmp_path / "heads" / "9.tsr").write_bytes(b"token")  # other names are not heads
    (tmp_path / "heads" / "007.note").write_bytes(b"x")
    assert [size for size, _ in list_heads(tmp_path)] == [5, 10]
    os.symlink("/etc/passwd", tmp_path / "heads" / "11.note")
    with pytest.raises(FormatError, match="11.note"):
        list_heads(tmp_path)
    os.unlink(tmp_path / "heads" / "11.note")
    os.mkfifo(tmp_path / "heads" / "12.note")
    with pytest.raises(FormatError, match="12.note"):
        list_heads(tmp_path)
    os.unlink(tmp_path / "heads" / "12.note")
    (tmp_path / "heads" / "13.note").write_bytes(b"x" * (17 << 10))
    with pytest.raises(FormatError, match="13.note"):
        list_heads(tmp_path)
    assert list_heads(tmp_path / "nowhere") == []


def test_heads_file_in_the_way_warns_and_the_ledger_is_still_written(tmp_path):
    (tmp_path / "L").mkdir()
    writer = LedgerWriter.create(tmp_path / "L", SIGNER, run_id="r")
    (tmp_path / "L" / "heads").write_bytes(b"not a directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer.append("checkpoint", 0, {"path": "x"})
        writer.seal()
    assert any("heads/1.note" in str(w.message) for w in caught)
    assert [e.kind for e in ledger.open(tmp_path / "L").entries()] == [Kind.GENESIS, Kind.CHECKPOINT, Kind.SEAL]


def test_format_doc_carries_the_note_vector():
    block = re.search(r"<!-- note-vector:begin -->\n```\n(.*?)```\n<!-- note-vector:end -->", DOC.read_text(),
                      re.S)
    assert block is not None
    from test_notes import VECTOR_NOTE

    assert block.group(1).encode() == VECTOR_NOTE


def test_the_recorder_s_checkpoints_carry_heads_and_the_schema_reads_them(tmp_path):
    pytest.importorskip("torch")
    from recipes import TinyRecipe

    from ledger.hooks import train

    seen: list[int] = []
    train(TinyRecipe(), steps=6, path=tmp_path / "L", key=SIGNER, seed=3, checkpoint_every=3)
    entries = list(ledger.open(tmp_path / "L").entries())
    hashes = [e.hash for e in entries]
    for entry in entries:
        if entry.kind is Kind.CHECKPOINT:
            body = CheckpointBody.from_body(entry.body())
            assert body.tree_head is not None and body.tree_head.size == entry.seq
            assert body.tree_head.root == merkle_root(hashes[:entry.seq])
            assert body.to_body()["tree_head"] == entry.body()["tree_head"]
            seen.append(entry.seq)
    assert len(seen) == 3 and [s for s, _ in list_heads(tmp_path / "L")] == [*seen, len(entries)]


# ---------------------------------------------------------------- verify: check heads
def verify_heads(path: Path, key=True):
    from ledger.verify import verify_ledger

    return verify_ledger(path, key=SIGNER.public if key else None).check("heads")


def test_an_honest_ledger_passes_heads_and_a_missing_heads_file_is_fine(tmp_path):
    path = write_run(tmp_path / "L")
    result = verify_heads(path)
    assert result.status == "pass" and result.data["checkpoint_heads"] == 2 and result.data["published_heads"] == 3
    assert verify_heads(path, key=False).status == "warn"
    (path / "heads" / "5.note").unlink()  # heads/ is for publishing: the ledger keeps the head
    assert verify_heads(path).status == "pass"


def test_a_ledger_without_heads_skips(tmp_path):
    writer = LedgerWriter.create(tmp_path / "L", SIGNER, run_id="r")
    writer.append("step", 0, step_body(0))
    writer.close()
    assert verify_heads(tmp_path / "L").status == "skip"


def test_a_forged_published_head_fails_naming_it(tmp_path):
    path = write_run(tmp_path / "L")
    other = Signer.from_seed(bytes(32))
    note = (path / "heads" / "5.note").read_bytes()
    head = open_note(note, SIGNER.public.raw)[0]
    (path / "heads" / "5.note").unlink()
    (path / "heads" / "5.note").write_bytes(sign_note(head, other))
    result = verify_heads(path)
    assert result.status == "fail" and "heads/5.note: not signed by the trainer's key" in result.detail
    (path / "heads" / "5.note").unlink()
    (path / "heads" / "5.note").write_bytes(note.replace(b"\n5\n", b"\n6\n"))
    assert "heads/5.note: states size 6" in verify_heads(path).detail
    (path / "heads" / "5.note").unlink()
    (path / "heads" / "5.note").write_bytes(b"garbage")
    assert "heads/5.note: not a signed tree head" in verify_heads(path).detail


def test_a_head_the_ledger_does_not_extend_is_a_fork(tmp_path):
    ours = write_run(tmp_path / "ours", checkpoints=(3,), steps=6, seal=False)
    longer = write_run(tmp_path / "longer", checkpoints=(3, 7), steps=10)  # the same first entries, then more
    forked = write_run(tmp_path / "forked", checkpoints=(1, 3), steps=6)  # same run and key, other entries
    assert verify_heads(ours).status == "pass"
    # a head of the longer ledger: ours holds fewer entries than it states
    final = max(list_heads(longer))
    (ours / "heads" / head_file(final[0])).write_bytes(final[1])
    result = verify_heads(ours)
    assert result.status == "fail" and f"a signed head of {final[0]} entries" in result.detail \
        and result.data["forks"] == [final[0]]
    (ours / "heads" / head_file(final[0])).unlink()
    # a head signed by the trainer's key over other entries at a size ours has
    size, note = next((s, n) for s, n in list_heads(forked) if s == 6)
    (ours / "heads" / head_file(size)).write_bytes(note)
    result = verify_heads(ours)
    assert result.status == "fail" and f"fork at size {size}" in result.detail and result.data["forks"] == [size]


def head_file(size: int) -> str:
    return f"{size}.note"


def test_checkpoint_heads_that_do_not_state_their_prefix_fail(tmp_path):
    def ledger_with(tree_head) -> Path:
        path = tmp_path / f"L{len(list(tmp_path.iterdir()))}"
        writer = LedgerWriter.create(path, SIGNER, run_id="run-heads", clock=fixed_clock())
        writer._origin = None  # write the field ourselves, signed into the entry by the trainer's key
        writer.append("step", 0, step_body(0))
        writer.append("checkpoint", 0, {"path": "c", "tree_head": tree_head(writer)})
        writer.close()
        return path

    def signed(size: int, root: bytes) -> dict:
        text = TreeHead(origin_of("run-heads"), size, root).text()
        return {"size": size, "root": root, "signature": SIGNER.sign_bytes(text)}

    good = ledger_with(lambda w: signed(2, w._tree.root()))
    assert verify_heads(good).status == "pass"
    wrong_root = verify_heads(ledger_with(lambda w: signed(2, bytes(32))))
    assert wrong_root.status == "fail" and "fork at size 2" in wrong_root.detail
    wrong_size = verify_heads(ledger_with(lambda w: signed(1, w._tree.root())))
    assert "checkpoint seq 2: tree_head size 1 is not its seq" in wrong_size.detail
    forged = verify_heads(ledger_with(lambda w: {**signed(2, w._tree.root()), "signature": bytes(64)}))
    assert "checkpoint seq 2: tree_head signature does not verify" in forged.detail
    malformed = verify_heads(ledger_with(lambda w: {"size": 2}))
    assert malformed.status == "fail" and "checkpoint seq 2: tree_head" in malformed.detail


# ---------------------------------------------------------------- review fixes
def test_hostile_heads_cost_no_signature_checks_and_no_prefix_roots(tmp_path, monkeypatch):
    """Notes that repeat the key's one valid line (100 times) or are empty are refused before any
    signature check and before any prefix root is computed: verify stays linear in the honest heads."""
    import ledger._note as note_module
    import ledger.verify._heads as heads_check

    path = write_run(tmp_path / "L")
    note = (path / "heads" / "10.note").read_bytes()
    text, line = note.split(b"\n\n")
    for size in range(20, 60):  # wrong size for their text, and 100 lines by one key
        (path / "heads" / f"{size}.note").write_bytes(text + b"\n\n" + line * 100)
    for size in range(60, 100):
        (path / "heads" / f"{size}.note").write_bytes(b"")
    (path / "heads" / "10.note").write_bytes(text + b"\n\n" + line * 100)  # right size and origin, 100 lines
    calls = {"verify": 0, "roots": set()}
    real_verify, real_roots = note_module.verify_bytes, heads_check.prefix_roots

    def counting_verify(*args):
        calls["verify"] += 1
        return real_verify(*args)

    def counting_roots(hashes, sizes):
        calls["roots"] |= set(sizes)
        return real_roots(hashes, sizes)

    monkeypatch.setattr(note_module, "verify_bytes", counting_verify)
    monkeypatch.setattr(heads_check, "prefix_roots", counting_roots)
    result = verify_heads(path)
    assert result.status == "fail" and "heads/10.note: not a signed tree head" in result.detail
    assert "by the same key" in " ".join(result.data["problems"])
    assert calls["verify"] <= 2  # heads/5.note and heads/14.note; never the 100-line notes
    assert calls["roots"] <= {5, 10, 14}  # only heads that verified (and the checkpoint heads)


@pytest.mark.parametrize("mode", ["never", "group"])
def test_the_log_is_fsynced_before_a_head_is_signed_in_every_mode(tmp_path, monkeypatch, mode):
    """fsync="never" and a power loss after a checkpoint left heads/7.note durable over entries that
    were not: an honest resume then forked from its own head. The log is fsynced first, always."""
    import ledger._wal as wal
    import ledger._writer as writer_module

    events: list[str] = []
    real_fsync, real_sign = wal.WalWriter.fsync, Signer.sign_bytes
    monkeypatch.setattr(wal.WalWriter, "fsync", lambda self: (events.append("fsync"), real_fsync(self))[1])
    monkeypatch.setattr(Signer, "sign_bytes", lambda self, data: (events.append("sign head"), real_sign(self, data))[1])
    real_write = writer_module.write_head
    monkeypatch.setattr(writer_module, "write_head", lambda *a: (events.append("publish"), real_write(*a))[1])
    writer = LedgerWriter.create(tmp_path / "L", SIGNER, run_id="r", clock=fixed_clock(), fsync=mode,
                                 fsync_interval=3600)
    for i in range(6):
        writer.append("step", i, step_body(i))
    events.clear()
    writer.append("checkpoint", 5, {"path": "c/5"})
    assert events == ["fsync", "sign head", "publish"]
    writer.close()


def test_heads_a_crash_left_out_are_written_on_reopen(tmp_path, monkeypatch, capsys):
    """Killed after a checkpoint entry but before heads/<size>.note: open() rebuilds the note from the
    entry's tree_head. Killed after the seal but before the final head: opening the sealed ledger
    with the key writes it (and still refuses it); prove says so meanwhile."""
    import ledger._writer as writer_module
    from ledger._cli import main

    class Killed(BaseException):
        pass

    def killed(*args):
        raise Killed

    path = tmp_path / "L"
    writer = LedgerWriter.create(path, SIGNER, run_id="cr-run", clock=fixed_clock())
    for i in range(4):
        writer.append("step", i, step_body(i))
    monkeypatch.setattr(writer_module, "write_head", killed)
    with pytest.raises(Killed):
        writer.append("checkpoint", 3, {"path": "c/3"})
    writer.release()
    monkeypatch.undo()
    assert list_heads(path) == []
    seen: list[int] = []
    writer = LedgerWriter.open(path, SIGNER, clock=fixed_clock(), on_head=lambda size, note: seen.append(size))
    assert [size for size, _ in list_heads(path)] == [5] == seen
    assert open_note(list_heads(path)[0][1], SIGNER.public.raw)[1]

    writer.append("step", 4, step_body(4))
    monkeypatch.setattr(writer_module, "write_head", killed)
    with pytest.raises(Killed):
        writer.seal()
    monkeypatch.undo()
    assert [size for size, _ in list_heads(path)] == [5]
    with pytest.raises(SystemExit) as exit_info:
        main(["prove", str(path), "--seq", "6", "--out", str(tmp_path / "p.json")])
    assert exit_info.value.code == 2 and "final head heads/8.note is missing" in capsys.readouterr().err
    with pytest.raises(ledger.errors.ConfigurationError, match="final signed tree head, missing from heads/, was"):
        LedgerWriter.open(path, SIGNER)
    final = list_heads(path)[-1]
    assert final[0] == 8 and open_note(final[1], SIGNER.public.raw) == (
        TreeHead(origin_of("cr-run"), 8, merkle_root([e.hash for e in ledger.open(path).entries()])), True)
    with pytest.raises(SystemExit) as exit_info:
        main(["prove", str(path), "--seq", "6", "--out", str(tmp_path / "p.json")])
    assert exit_info.value.code == 0
    verified = ledger.verify.verify_ledger(path, key=SIGNER.public).check("heads")
    assert verified.status == "pass"


def test_reopening_a_sealed_ledger_signs_no_head_over_an_edited_seal(tmp_path):
    """The final head a crash left out is written on reopen only over what the key signed: an edited
    seal (nothing links after it, so the chain still links) gets no head (second-pass review)."""
    from ledger._entry import Entry
    from ledger._parts import entries_table, list_parts, read_part, table_entries, write_part

    path = tmp_path / "L"
    writer = LedgerWriter.create(path, SIGNER, run_id="edited-seal", clock=fixed_clock())
    writer.append("step", 0, step_body(0))
    writer.seal({"final": "aaaaaaaa"})
    size = len(list(ledger.open(path).entries()))
    os.unlink(path / "heads" / f"{size}.note")  # the crash window: the seal written, its head not
    part = list_parts(path / "parts")[-1]
    table = read_part(part)
    entries = table_entries(table)
    entries[-1] = Entry(record=entries[-1].record.replace(b"aaaaaaaa", b"bbbbbbbb"),
                        signature=entries[-1].signature, key_id=entries[-1].key_id)
    os.chmod(part, 0o644)
    os.unlink(part)
    write_part(part, entries_table(entries, "edited-seal", [dict(m) for m in table["metrics"].to_pylist()]),
               "edited-seal")
    with pytest.warns(RuntimeWarning, match="could not be written"), pytest.raises(Exception, match="is sealed"):
        LedgerWriter.open(path, SIGNER)
    assert list_heads(path) == []
