"""Known-answer tests: the test vectors printed in docs/FORMAT.md §8 are reproduced exactly,
by the writer and by the pure functions, so a second implementation can be checked against them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import ledger
from ledger import LedgerWriter, Signer
from ledger._record import merkle_root
from ledger.format import entry_hash, pae

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
VECTOR_SEED = bytes(range(32))
VECTOR_RUN_ID = "00112233445566778899aabbccddeeff"


def build_vectors(path: Path) -> dict:
    """Write the vector chain with the real writer and describe it."""
    times = iter([1_767_225_600_000_000_000 + i * 1_000_000_000 for i in range(10)])
    writer = LedgerWriter.create(path, Signer.from_seed(VECTOR_SEED), genesis={"config": {"lr": 0.001}},
                                 run_id=VECTOR_RUN_ID, clock=lambda: next(times))
    writer.append("step", 0, {"metrics": {"loss": 2.5, "lr": 0.001}})
    writer.append("step", 1, {"metrics": {"loss": 2.25, "lr": 0.001}, "norms": [1.5, float("nan")]})
    writer.seal()
    entries = list(ledger.open(path).entries())
    return {
        "private_seed": VECTOR_SEED.hex(),
        "public_key": Signer.from_seed(VECTOR_SEED).public.raw.hex(),
        "key_id": Signer.from_seed(VECTOR_SEED).public.key_id.hex(),
        "run_id": VECTOR_RUN_ID,
        "tree_root_before_seal": merkle_root([e.hash for e in entries[:-1]]).hex(),
        "entries": [{"seq": e.seq, "kind": e.kind.label, "record": e.record.hex(), "hash": e.hash.hex(),
                     "signature": e.signature.hex()} for e in entries],
    }


def documented_vectors() -> dict:
    match = re.search(r"<!-- vectors:begin -->\s*```json\n(.*?)```\s*<!-- vectors:end -->", DOC.read_text(), re.S)
    assert match, "docs/FORMAT.md has no vectors block"
    return json.loads(match.group(1))


def test_writer_reproduces_documented_vectors(tmp_path):
    assert build_vectors(tmp_path / "v") == documented_vectors()


def test_vectors_hold_with_plain_primitives():
    """Recompute hashes, links and signatures from the documented hex with only hashlib and
    cryptography, as a second implementation would."""
    import hashlib

    vec = documented_vectors()
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(vec["public_key"]))
    assert Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vec["private_seed"])).public_key().public_bytes_raw() \
        == bytes.fromhex(vec["public_key"])
    prev = bytes(32)
    for e in vec["entries"]:
        record = bytes.fromhex(e["record"])
        assert hashlib.sha256(b"\x00" + record).hexdigest() == e["hash"] == entry_hash(record).hex()
        assert record[60:92] == prev
        assert int.from_bytes(record[4:12], "big") == e["seq"]
        msg = b"DSSEv1 41 application/vnd.training-ledger.record.v1 " + str(len(record)).encode() + b" " + record
        assert msg == pae(record)
        public.verify(bytes.fromhex(e["signature"]), msg)
        prev = bytes.fromhex(e["hash"])


def test_dsse_pae_matches_the_dsse_specification_example():
    # DSSE protocol.md: PAE("http://example.com/HelloWorld", "hello world")
    from ledger import _record

    prefix = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    body = b"hello world"
    assert b"DSSEv1 %d %s %d %s" % (29, b"http://example.com/HelloWorld", len(body), body) == prefix
    assert _record.pae(b"x").startswith(b"DSSEv1 41 application/vnd.training-ledger.record.v1 1 x")


def test_ed25519_rfc8032_test_vector_1():
    secret = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    key = Ed25519PrivateKey.from_private_bytes(secret)
    assert key.public_key().public_bytes_raw().hex() == \
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert key.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def test_merkle_root_rfc9162_shape():
    leaves = [entry_hash(bytes([i])) for i in range(7)]
    node = ledger._record.node_hash
    expected = node(node(node(leaves[0], leaves[1]), node(leaves[2], leaves[3])),
                    node(node(leaves[4], leaves[5]), leaves[6]))
    assert merkle_root(leaves) == expected
    assert merkle_root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


GOLDEN = Path(__file__).resolve().parent / "golden"


def test_golden_v1_ledger_still_verifies_and_matches_the_vectors():
    """A ledger written by format version 1 (kept in the repo) stays readable and valid."""
    from ledger.verify import verify_ledger

    before = {p: p.read_bytes() for p in (GOLDEN / "v1").rglob("*") if p.is_file()}
    report = verify_ledger(GOLDEN / "v1", key=GOLDEN / "v1.pub")
    assert report.verdict == "pass" and report.rests_on == ["chain", "signatures", "seal"]
    records = [e.record.hex() for e in ledger.open(GOLDEN / "v1").entries()]
    assert records == [e["record"] for e in documented_vectors()["entries"]]
    assert before == {p: p.read_bytes() for p in (GOLDEN / "v1").rglob("*") if p.is_file()}


def test_merkle_batch_incremental_and_recursive_forms_agree():
    from ledger._record import MerkleAccumulator, node_hash

    def recursive(leaves):
        if len(leaves) == 1:
            return leaves[0]
        k = 1
        while k * 2 < len(leaves):
            k *= 2
        return node_hash(recursive(leaves[:k]), recursive(leaves[k:]))

    for n in range(1, 70):
        leaves = [entry_hash(n.to_bytes(2, "big") + bytes([i])) for i in range(n)]
        acc = MerkleAccumulator()
        for leaf in leaves:
            acc.add(leaf)
        assert merkle_root(leaves) == acc.root() == recursive(leaves), n
