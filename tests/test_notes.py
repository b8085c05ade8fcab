"""Signed tree heads (ledger/_note.py): C2SP signed-note and tlog-checkpoint, checked against the
reference implementation's known answers (golang.org/x/mod/sumdb/note, the C2SP spec example) and
against hostile bytes."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger._crypto import Signer
from ledger._note import (
    MAX_NOTE_BYTES,
    TreeHead,
    key_hash,
    note_from_signature,
    note_signature,
    open_note,
    origin_of,
    parse_checkpoint,
    sign_note,
    split_note,
    verifier_key,
)
from ledger._record import entry_hash, merkle_root
from ledger.errors import FormatError

# golang.org/x/mod/sumdb/note package documentation (ExampleSign / ExampleOpen): Ed25519 is
# deterministic, so signing the same text with the same seed reproduces the signature exactly.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = b"If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_SIG = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
# The C2SP signed-note specification's example (verifier key and note).
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = ("This is an example message.\n\n— example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg"
             "1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n").encode()
# docs/FORMAT.md §13 vector: seed 00 01 … 1f, run id "example-run", 3 leaves entry_hash(0x00|0x01|0x02).
VECTOR_NOTE = ("training-ledger/example-run\n3\nO2zM1+PgI/85MAbwMDFe562esRGwIrQfun5bejlz9og=\n\n— training-ledger/"
               "example-run ELOSp3T3e5lp86OnM0ph7xY/fGQA33Rt3ldQOrFzGUMMF46r9sjShu+UEXYe/lTrR0sC1kyxbPhbB+Lxu/2hEHgH"
               "ygU=\n").encode()


def _go_signer() -> Signer:
    return Signer.from_seed(base64.b64decode(GO_SKEY.split("+", 4)[4])[1:])


def test_go_reference_key_hash_verifier_key_and_signature():
    signer = _go_signer()
    assert key_hash("PeterNeumann", signer.public.raw).hex() == "c74f20a3"
    assert verifier_key("PeterNeumann", signer.public.raw) == GO_VKEY
    assert base64.b64encode(key_hash("PeterNeumann", signer.public.raw) + signer.sign_bytes(GO_TEXT)).decode() \
        == GO_SIG
    text, lines = split_note(GO_TEXT + "\n— PeterNeumann ".encode() + GO_SIG.encode() + b"\n")
    assert text == GO_TEXT and [(x.name, x.key_hash.hex()) for x in lines] == [("PeterNeumann", "c74f20a3")]


def test_c2sp_spec_example_verifies_with_its_verifier_key():
    from ledger._crypto import verify_bytes

    name, hash_hex, b64 = SPEC_VKEY.split("+")
    raw = base64.b64decode(b64)
    assert raw[0] == 1 and key_hash(name, raw[1:]).hex() == hash_hex
    text, lines = split_note(SPEC_NOTE)
    assert lines[0].key_hash.hex() == hash_hex
    assert verify_bytes(raw[1:], text, lines[0].signature)
    assert not verify_bytes(raw[1:], text.replace(b"example", b"exbmple"), lines[0].signature)


def test_format_vector_tree_head():
    signer = Signer.from_seed(bytes(range(32)))
    root = merkle_root([entry_hash(bytes([i])) for i in range(3)])
    head = TreeHead(origin_of("example-run"), 3, root)
    assert sign_note(head, signer) == VECTOR_NOTE
    assert open_note(VECTOR_NOTE, signer.public.raw) == (head, True)
    assert note_signature(VECTOR_NOTE, signer.public.raw) is not None
    assert note_from_signature(head, signer.public.raw, note_signature(VECTOR_NOTE, signer.public.raw)) \
        == VECTOR_NOTE


def test_forged_or_foreign_heads_do_not_verify():
    signer, other = Signer.from_seed(bytes(32)), Signer.from_seed(bytes([1]) * 32)
    head = TreeHead(origin_of("r"), 10, bytes(range(32)))
    note = sign_note(head, signer)
    assert open_note(note, other.public.raw) == (head, False)  # another key: no line of it
    assert open_note(note, None) == (head, False)
    forged = note.replace(b"\n10\n", b"\n11\n")
    parsed, ok = open_note(forged, signer.public.raw)
    assert parsed.size == 11 and not ok
    # a second line by our key (good or bad) is refused: a key signs a note once, and a note costs
    # at most one signature check (100 repeated lines per note made verify 45x slower)
    bad_line = note_from_signature(head, signer.public.raw, bytes(64)).split(b"\n\n")[1]
    for extra in (bad_line, note.split(b"\n\n")[1], bad_line * 99):
        with pytest.raises(FormatError, match="by the same key"):
            open_note(note + extra, signer.public.raw)
    assert open_note(note.split(b"\n\n")[0] + b"\n\n" + bad_line, signer.public.raw) == (head, False)
    # a cosignature by another key is kept apart and does not matter
    cosigned = note + sign_note(TreeHead(head.origin, 10, head.root), other).split(b"\n\n")[1]
    assert open_note(cosigned, signer.public.raw) == (head, True)


def test_origin_escapes_what_a_key_name_cannot_hold():
    assert origin_of("abc") == "training-ledger/abc"
    assert origin_of("a b+c%d\té") == "training-ledger/a%20b%2Bc%25d%09é"
    assert origin_of("a b") != origin_of("a%20b")
    with pytest.raises(FormatError):
        origin_of("x" * 2000)


@pytest.mark.parametrize("bad", [
    b"",
    b"no blank line\n",
    b"origin\n1\nAAAA\n\n",  # no signature lines
    VECTOR_NOTE[:-1],  # signature block without final newline
    VECTOR_NOTE.replace("—".encode(), b"-"),  # ASCII hyphen
    VECTOR_NOTE.replace(b"example-run\n", b"example-run\r\n", 1),  # control character
    VECTOR_NOTE + b"\xff\n",  # not UTF-8
    VECTOR_NOTE.replace(b"ygU=", b"ygU"),  # not padded base64
    VECTOR_NOTE.replace(b"\n3\n", b"\n03\n"),  # leading zero
    VECTOR_NOTE.replace(b"\n3\n", b"\n-3\n"),
    VECTOR_NOTE.replace(b"\n3\n", b"\n99999999999999999999999\n"),
    VECTOR_NOTE.replace(b"9og=\n", b"9og=\nextension\n"),  # extension lines are not used here
    VECTOR_NOTE.replace(b"O2zM1+PgI/85MAbwMDFe562esRGwIrQfun5bejlz9og=", b"AAAA"),  # root not 32 bytes
    VECTOR_NOTE.replace("— training-ledger/example-run ".encode(), "— a+b ".encode()),
    VECTOR_NOTE + "— x AAAA\n".encode(),  # signature shorter than a key hash
    VECTOR_NOTE + "— x AAAAAAAA\n".encode() * 101,
    VECTOR_NOTE + b"x" * MAX_NOTE_BYTES,
])
def test_malformed_notes_are_refused(bad):
    with pytest.raises(FormatError):
        open_note(bad, Signer.from_seed(bytes(range(32))).public.raw)


def test_parse_checkpoint_round_trips():
    head = TreeHead("o", 0, bytes(32))
    assert parse_checkpoint(head.text()) == head
    with pytest.raises(FormatError):
        TreeHead("o", -1, bytes(32))
    with pytest.raises(FormatError):
        TreeHead("o o", 1, bytes(32))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.builds(lambda a, b: VECTOR_NOTE[:a] + b + VECTOR_NOTE[a:],
                                           st.integers(0, len(VECTOR_NOTE)), st.binary(max_size=8)))
def test_arbitrary_bytes_raise_only_format_errors(data):
    try:
        head, ok = open_note(data, Signer.from_seed(bytes(range(32))).public.raw)
    except FormatError:
        return
    assert isinstance(head, TreeHead) and (not ok or data == VECTOR_NOTE or head.text() in data)
