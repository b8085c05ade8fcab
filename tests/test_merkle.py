"""RFC 9162 inclusion and consistency proofs (ledger/_merkle.py): the published test vectors of
transparency-dev/merkle (testonly/constants.go, proof/verify_test.go), the RFC's recursive
definitions for every tree size up to 300, random large trees, and a proof over 10^6 leaves."""

from __future__ import annotations

import hashlib
import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger._merkle import (
    EMPTY_ROOT,
    ProofError,
    consistency_proof,
    inclusion_proof,
    root_from_inclusion,
    subtree_root,
    verify_consistency,
    verify_inclusion,
)
from ledger._record import MerkleAccumulator, entry_hash, merkle_root, node_hash

h = bytes.fromhex
# transparency-dev/merkle testonly/constants.go: leaf inputs and the roots of trees of 1 … 8 of them
LEAF_INPUTS = [h(x) for x in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                              "606162636465666768696a6b6c6d6e6f")]
LEAVES = [entry_hash(x) for x in LEAF_INPUTS]
ROOTS = [h(x) for x in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]
# proof/verify_test.go inclusionProofs (leaf is 1-based there) and consistencyProofs
INCLUSION = [
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CONSISTENCY = [
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


# ---------------------------------------------------------------- the RFC's recursive definitions
def mth(d: list[bytes]) -> bytes:
    if not d:
        return EMPTY_ROOT
    if len(d) == 1:
        return d[0]
    k = 1 << ((len(d) - 1).bit_length() - 1)
    return node_hash(mth(d[:k]), mth(d[k:]))


def path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = 1 << ((len(d) - 1).bit_length() - 1)
    return path(m, d[:k]) + [mth(d[k:])] if m < k else path(m - k, d[k:]) + [mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [mth(d)]
    k = 1 << ((len(d) - 1).bit_length() - 1)
    return subproof(m, d[:k], b) + [mth(d[k:])] if m <= k else subproof(m - k, d[k:], False) + [mth(d[:k])]


def leaves_of(n: int, salt: int = 0) -> list[bytes]:
    return [entry_hash(salt.to_bytes(4, "big") + i.to_bytes(8, "big")) for i in range(n)]


# ---------------------------------------------------------------- published vectors
def test_transparency_dev_roots():
    for n, root in enumerate(ROOTS):
        assert subtree_root(LEAVES, 0, n) == merkle_root(LEAVES[:n]) == root


@pytest.mark.parametrize("leaf, size, proof", INCLUSION)
def test_transparency_dev_inclusion_vectors(leaf, size, proof):
    proof = [h(p) for p in proof]
    assert inclusion_proof(LEAVES, leaf - 1, size) == proof
    assert verify_inclusion(leaf - 1, size, LEAVES[leaf - 1], proof, ROOTS[size])
    # transparency-dev's corruptions (corruptInclusionProof): none verifies
    i, root, leafh = leaf - 1, ROOTS[size], LEAVES[leaf - 1]
    probes = [(i - 1, size, leafh, proof, root), (i + 1, size, leafh, proof, root), (i ^ 2, size, leafh, proof, root),
              (i, size * 2, leafh, proof, root), (i, size // 2, leafh, proof, root),
              (i, size, b"WrongLeaf", proof, root), (i, size, leafh, proof, EMPTY_ROOT),
              (i, size, leafh, proof, SOME_HASH), (i, size, leafh, [*proof, b""], root),
              (i, size, leafh, [*proof, root], root), (i, size, leafh, [b"", *proof], root),
              (i, size, leafh, [root, *proof], root), (i, size, leafh, proof[:-1], root)]
    probes += [(i, size, leafh, [p if j != k else bytes([p[0] ^ 8]) + p[1:] for j, p in enumerate(proof)], root)
               for k in range(len(proof))]
    if len(proof) > 1:
        probes.append((i, size, leafh, [proof[0], SOME_HASH, *proof[1:]], root))
    for probe in probes:
        assert not verify_inclusion(*probe), probe[:2]


@pytest.mark.parametrize("size1, size2, proof", CONSISTENCY)
def test_transparency_dev_consistency_vectors(size1, size2, proof):
    proof = [h(p) for p in proof]
    assert consistency_proof(LEAVES, size1, size2) == proof
    r1, r2 = ROOTS[size1], ROOTS[size2]
    assert verify_consistency(size1, size2, r1, r2, proof)
    probes = [(size1 - 1, size2, r1, r2, proof), (size1 + 1, size2, r1, r2, proof), (size1 ^ 2, size2, r1, r2, proof),
              (size1, size2 * 2, r1, r2, proof), (size1, size2 // 2, r1, r2, proof),
              (size1, size2, b"WrongRoot", r2, proof), (size1, size2, r1, b"WrongRoot", proof),
              (size1, size2, r2, r1, proof), (size1, size2, r1, r2, []), (size1, size2, r1, r2, [*proof, b""]),
              (size1, size2, r1, r2, [*proof, r1]), (size1, size2, r1, r2, [*proof, r2]),
              (size1, size2, r1, r2, [b"", *proof]), (size1, size2, r1, r2, [r1, *proof]),
              (size1, size2, r1, r2, [r2, *proof]), (size1, size2, r1, r2, [proof[0], *proof]),
              (size1, size2, r1, r2, proof[:-1])]
    probes += [(size1, size2, r1, r2, [p if j != k else bytes([p[0] ^ 16]) + p[1:] for j, p in enumerate(proof)])
               for k in range(len(proof))]
    for probe in probes:
        assert not verify_consistency(*probe), probe[:2]


def test_trivial_and_impossible_sizes():
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 5, EMPTY_ROOT, ROOTS[5], [])
    assert verify_consistency(3, 3, ROOTS[3], ROOTS[3], [])
    assert not verify_consistency(3, 3, ROOTS[3], ROOTS[4], [])
    assert not verify_consistency(3, 3, ROOTS[3], ROOTS[3], [EMPTY_ROOT])
    assert not verify_consistency(2, 1, ROOTS[2], ROOTS[1], [])
    assert not verify_consistency(1, 2, ROOTS[1], ROOTS[2], [])
    assert verify_inclusion(0, 1, LEAVES[0], [], LEAVES[0])
    for index, size in ((0, 0), (1, 0), (2, 1), (-1, 3)):
        assert root_from_inclusion(index, size, SOME_HASH, []) is None
    for bad in ((LEAVES, 8, 8), (LEAVES, 0, 0), (LEAVES, 0, 9), (LEAVES, -1, None)):
        with pytest.raises(ProofError):
            inclusion_proof(*bad)
    with pytest.raises(ProofError):
        consistency_proof(LEAVES, 5, 4)
    assert not verify_inclusion(0, 2, LEAVES[0], [LEAVES[1]] * 65, ROOTS[2])  # longer than any tree needs


# ---------------------------------------------------------------- every size up to 300
def test_every_size_up_to_300_matches_the_rfc_definitions():
    leaves = leaves_of(300)
    acc = MerkleAccumulator()
    for n in range(1, 301):
        acc.add(leaves[n - 1])
        d = leaves[:n]
        root = mth(d)
        assert subtree_root(leaves, 0, n) == acc.root() == root
        for m in {0, n - 1, n // 2, (n * 7) % n, 1 % n}:
            proof = inclusion_proof(leaves, m, n)
            assert proof == path(m, d)
            assert verify_inclusion(m, n, d[m], proof, root)
            assert not verify_inclusion(m, n, SOME_HASH, proof, root)
        for m in {1, n // 2 or 1, n - 1 or 1, n, max(1, n - 2)}:
            proof = consistency_proof(leaves, m, n)
            assert proof == (subproof(m, d, True) if m < n else [])
            assert verify_consistency(m, n, mth(d[:m]), root, proof)
            if m < n:
                assert not verify_consistency(m, n, mth(d[:m]), mth(d[:n - 1]), proof)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1), st.integers(1, n))))
def test_all_leaves_and_prefixes_hypothesis(case):
    n, m, old = case
    leaves = leaves_of(n, salt=1)
    root = mth(leaves)
    assert verify_inclusion(m, n, leaves[m], inclusion_proof(leaves, m, n), root)
    proof = consistency_proof(leaves, old, n)
    assert verify_consistency(old, n, mth(leaves[:old]), root, proof)
    # a proof for one pair of sizes is not a proof for another
    if old < n and proof:
        assert not verify_consistency(old, n, mth(leaves[:old]), root, proof[:-1])
        assert not verify_consistency(old, n, root, mth(leaves[:old]), proof)


@settings(max_examples=25, deadline=None)
@given(st.integers(301, 20_000), st.randoms(use_true_random=False))
def test_random_large_trees(n, rnd):
    leaves = leaves_of(n, salt=2)
    root = merkle_root(leaves)
    m = rnd.randrange(n)
    proof = inclusion_proof(leaves, m, n)
    assert len(proof) <= (n - 1).bit_length() and verify_inclusion(m, n, leaves[m], proof, root)
    old = rnd.randrange(1, n + 1)
    assert verify_consistency(old, n, merkle_root(leaves[:old]), root, consistency_proof(leaves, old, n))
    forged = list(leaves)
    forged[rnd.randrange(old)] = SOME_HASH  # a rewritten prefix is not consistent with the old head
    assert not verify_consistency(old, n, merkle_root(leaves[:old]), merkle_root(forged),
                                  consistency_proof(forged, old, n))


def test_proofs_over_a_million_leaves_without_the_tree():
    n = 1_000_000
    leaves = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]
    root = merkle_root(leaves)
    rng = random.Random(7)
    m, old = rng.randrange(n), rng.randrange(1, n)
    tracemalloc.start()
    proof = inclusion_proof(leaves, m)
    cproof = consistency_proof(leaves, old)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 10  # O(log n): a few stacks of ≤ 20 hashes, not the 10^6-node tree
    assert len(proof) == 20 and verify_inclusion(m, n, leaves[m], proof, root)
    assert verify_consistency(old, n, merkle_root(leaves[:old]), root, cproof)


def test_the_subtree_cache_gives_the_same_proofs_and_roots():
    from ledger._merkle import SubtreeCache

    leaves = leaves_of(3000, salt=3)
    tree = SubtreeCache(leaves, block_level=3)
    for n in (1, 2, 7, 8, 9, 1000, 1024, 1025, 2047, 3000):
        assert tree.root(0, n) == subtree_root(leaves, 0, n)
        for m in {0, n // 3, n - 1}:
            assert inclusion_proof(leaves, m, n, tree) == inclusion_proof(leaves, m, n)
        for old in {1, n // 2 or 1, n}:
            assert consistency_proof(leaves, old, n, tree) == consistency_proof(leaves, old, n)
    assert tree.root(5, 9) == subtree_root(leaves, 5, 9)  # not a range of the recursion: streamed
