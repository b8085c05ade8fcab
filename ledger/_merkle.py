"""RFC 9162 Merkle inclusion and consistency proofs over entry hashes (§2.1.3–2.1.4).

Pure functions. Proofs are computed from the sequence of leaf hashes (the entry hashes, already
``SHA-256(0x00 ‖ record)``) without building the tree: every sibling subtree root is streamed from
its leaves with a stack of O(log n) hashes, so a proof over n leaves costs O(n) hashing and
O(log n) memory beyond the leaf hashes themselves. Verification follows the RFC's algorithms
step by step and costs O(log n).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from ledger._record import HASH_SIZE, merkle_root

EMPTY_ROOT = hashlib.sha256(b"").digest()
MAX_PATH = 64  # a tree of < 2^64 leaves has inclusion proofs of at most 64 hashes
MAX_CONSISTENCY = 2 * MAX_PATH  # and consistency proofs of at most ~2 × 64


class ProofError(ValueError):
    """A proof that cannot be computed for these sizes (a bad index or size)."""


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_root(leaves: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH of ``leaves[lo:hi]`` (RFC 9162 §2.1.1), streamed: a stack of perfect subtrees."""
    if hi <= lo:
        return EMPTY_ROOT
    stack: list[tuple[int, bytes]] = []
    for i in range(lo, hi):
        size, node = 1, leaves[i]
        while stack and stack[-1][0] == size:
            left_size, left = stack.pop()
            size, node = size + left_size, _node(left, node)
        stack.append((size, node))
    node = stack[-1][1]
    for _, left in reversed(stack[:-1]):
        node = _node(left, node)
    return node


class SubtreeCache:
    """The roots of the perfect subtrees of at least 2^``block_level`` leaves, each computed once
    on first use (about 2n / 2^block_level hashes: ~64 KiB for 10^6 leaves), so that many proofs
    and prefix roots over one ledger cost one pass over its leaves instead of one pass each."""

    def __init__(self, leaves: Sequence[bytes], block_level: int = 10) -> None:
        self.leaves, self._block = leaves, block_level
        self._nodes: dict[tuple[int, int], bytes] = {}

    def perfect(self, level: int, index: int) -> bytes:
        """The root of leaves [index·2^level, (index+1)·2^level)."""
        if level < self._block:
            return merkle_root(list(self.leaves[index << level:(index + 1) << level]))
        node = self._nodes.get((level, index))
        if node is None:
            node = merkle_root(list(self.leaves[index << level:(index + 1) << level])) if level == self._block \
                else _node(self.perfect(level - 1, 2 * index), self.perfect(level - 1, 2 * index + 1))
            self._nodes[(level, index)] = node
        return node

    def root(self, lo: int, hi: int) -> bytes:
        """MTH of ``leaves[lo:hi]`` for the ranges RFC 9162's recursion visits (``lo`` a multiple
        of the smallest power of two ≥ ``hi − lo``: prefixes, and every subtree of a proof); any
        other range is streamed."""
        if hi - lo <= 1 or lo % (1 << (hi - lo - 1).bit_length()):
            return subtree_root(self.leaves, lo, hi)
        nodes = []
        while lo < hi:  # perfect aligned nodes, largest first
            level = (hi - lo).bit_length() - 1
            nodes.append(self.perfect(level, lo >> level))
            lo += 1 << level
        node = nodes[-1]
        for left in reversed(nodes[:-1]):
            node = _node(left, node)
        return node


class PrefixTree:
    """Every perfect subtree root over a sequence of leaf hashes, level by level (about n hashes,
    computed once and held as 32 bytes each), so that the root of any prefix costs O(log n) hashes
    however many prefixes are asked for (the seal's tree root and every signed tree head's)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.size = len(leaves)
        levels = [b"".join(leaves)]  # level l: the roots of leaves [i·2^l, (i+1)·2^l), joined
        if len(levels[0]) != HASH_SIZE * self.size:
            raise ProofError("leaf hashes are 32 bytes each")
        pair, sha = 2 * HASH_SIZE, hashlib.sha256
        while len(levels[-1]) >= pair:
            below = levels[-1]
            levels.append(b"".join([sha(b"\x01" + below[i:i + pair]).digest()
                                    for i in range(0, len(below) - pair + 1, pair)]))
        self._levels = levels

    def root(self, size: int) -> bytes:
        """MTH of the first ``size`` leaves (RFC 9162 §2.1.1): its perfect aligned subtrees, largest
        first, folded from the right."""
        if not 0 <= size <= self.size:
            raise ProofError(f"no prefix of {size} leaves in a tree of {self.size}")
        nodes, lo = [], 0
        while lo < size:
            level = (size - lo).bit_length() - 1
            at = (lo >> level) * HASH_SIZE
            nodes.append(self._levels[level][at:at + HASH_SIZE])
            lo += 1 << level
        if not nodes:
            return EMPTY_ROOT
        node = nodes[-1]
        for left in reversed(nodes[:-1]):
            node = _node(left, node)
        return node


def _roots(leaves: Sequence[bytes], tree: SubtreeCache | None) -> Callable[[int, int], bytes]:
    return tree.root if tree is not None else (lambda lo, hi: subtree_root(leaves, lo, hi))


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int | None = None,
                    tree: SubtreeCache | None = None) -> list[bytes]:
    """PATH(index, D[0:size]) of RFC 9162 §2.1.3.1: the audit path of leaf ``index`` in the tree
    of the first ``size`` leaves (all of them by default), nearest sibling first. Streamed from the
    leaves (O(log n) memory), or from ``tree``'s cached subtrees."""
    root_of = _roots(leaves, tree)
    n = len(leaves) if size is None else size
    if not 0 <= index < n <= len(leaves):
        raise ProofError(f"no inclusion proof of leaf {index} in a tree of {n} leaves")
    path: list[bytes] = []
    lo, hi = 0, n
    while hi - lo > 1:  # descend to the leaf; siblings are collected root side first
        k = _split(hi - lo)
        if index - lo < k:
            path.append(root_of(lo + k, hi))
            hi = lo + k
        else:
            path.append(root_of(lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_proof(leaves: Sequence[bytes], old_size: int, size: int | None = None,
                      tree: SubtreeCache | None = None) -> list[bytes]:
    """PROOF(old_size, D[0:size]) of RFC 9162 §2.1.4.1: the hashes that show the tree of the
    first ``old_size`` leaves is a prefix of the tree of ``size`` leaves (empty when equal or
    when ``old_size`` is 0). Streamed, or from ``tree``'s cached subtrees."""
    root_of = _roots(leaves, tree)
    n = len(leaves) if size is None else size
    if not 0 <= old_size <= n <= len(leaves):
        raise ProofError(f"no consistency proof from {old_size} to {n} leaves")
    if old_size in (0, n):
        return []
    proof: list[bytes] = []
    m, lo, hi, complete = old_size, 0, n, True
    while m != hi - lo:  # SUBPROOF(m, D[lo:hi], complete)
        k = _split(hi - lo)
        if m <= k:
            proof.append(root_of(lo + k, hi))
            hi = lo + k
        else:
            proof.append(root_of(lo, lo + k))
            m, lo, complete = m - k, lo + k, False
    if not complete:
        proof.append(root_of(lo, hi))
    proof.reverse()
    return proof


def _well_formed(proof: Sequence[bytes], limit: int) -> bool:
    return len(proof) <= limit and all(isinstance(p, bytes) and len(p) == HASH_SIZE for p in proof)


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes | None:
    """RFC 9162 §2.1.3.2: the root that ``proof`` gives for ``leaf`` at ``index`` in a tree of
    ``size`` leaves, or None when the proof cannot be one for those numbers."""
    if not 0 <= index < size or len(leaf) != HASH_SIZE or not _well_formed(proof, MAX_PATH):
        return None
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, p)
        fn, sn = fn >> 1, sn >> 1
    return r if sn == 0 else None


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """True when ``proof`` shows ``leaf`` is leaf ``index`` of the tree of ``size`` leaves whose
    MTH is ``root`` (RFC 9162 §2.1.3.2)."""
    return root_from_inclusion(index, size, leaf, proof) == root


def verify_consistency(old_size: int, size: int, old_root: bytes, root: bytes, proof: Sequence[bytes]) -> bool:
    """True when ``proof`` shows the tree of ``old_size`` leaves with MTH ``old_root`` is a prefix
    of the tree of ``size`` leaves with MTH ``root`` (RFC 9162 §2.1.4.2). Equal sizes need equal
    roots and an empty proof; size 0 needs the empty tree's root and an empty proof."""
    if not 0 <= old_size <= size or len(old_root) != HASH_SIZE or len(root) != HASH_SIZE \
            or not _well_formed(proof, MAX_CONSISTENCY):
        return False
    if old_size == size:
        return not proof and old_root == root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = _node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == root


__all__ = ["EMPTY_ROOT", "PrefixTree", "ProofError", "SubtreeCache", "consistency_proof", "inclusion_proof",
           "root_from_inclusion", "subtree_root", "verify_consistency", "verify_inclusion"]
