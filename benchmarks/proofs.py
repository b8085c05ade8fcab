"""Benchmark of Merkle proofs for a 10^6-entry ledger (docs/PERFORMANCE.md, "Proofs").

Part 1, the Merkle math on 10^6 synthetic entry hashes (``ledger._merkle``): the root, an
inclusion proof and a consistency proof computed without building the tree (time, traced peak
memory), their sizes in bytes, and the time to verify each (RFC 9162 algorithms).

Part 2 (``--ledger N``, 0 to skip), the commands on a real ledger of N entries written by the real
writer (small step bodies, a checkpoint every N/10 entries, sealed): ``ledger prove --seq`` (one
entry, then ten), ``ledger verify-proof``, ``ledger prove --consistency-from`` the first checkpoint
head and ``ledger consistency``, each timed in-process through the CLI entry point, with the proof
files' sizes. Figures only, no assertions.

    python benchmarks/proofs.py                    # part 1 (~10 s) and part 2 with 10^6 entries (~4 min)
    python benchmarks/proofs.py --ledger 0         # part 1 only
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ledger import LedgerWriter, Signer
from ledger._cli import main
from ledger._crypto import public_key_pem
from ledger._heads import list_heads
from ledger._merkle import (
    SubtreeCache,
    consistency_proof,
    inclusion_proof,
    subtree_root,
    verify_consistency,
    verify_inclusion,
)

SIGNER = Signer.from_seed(bytes(32))


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, float]:
    """The result of ``fn`` and its median wall seconds over ``repeat`` runs."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times)


def merkle_part(n: int, seed: int) -> None:
    """Part 1: proofs over ``n`` synthetic leaf hashes."""
    rng = random.Random(seed)
    leaves = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)]
    root, t_root = timed(lambda: subtree_root(leaves, 0, n))
    index, old = rng.randrange(n), rng.randrange(1, n)
    path, t_incl = timed(lambda: inclusion_proof(leaves, index))
    cons, t_cons = timed(lambda: consistency_proof(leaves, old))
    tracemalloc.start()  # memory measured apart: tracing slows Python down several times
    inclusion_proof(leaves, index)
    peak_incl = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    consistency_proof(leaves, old)
    peak_cons = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tree = SubtreeCache(leaves)
    _, t_first = timed(lambda: inclusion_proof(leaves, index, None, tree))
    others = [rng.randrange(n) for _ in range(100)]
    _, t_more = timed(lambda: [inclusion_proof(leaves, i, None, tree) for i in others])
    old_root = subtree_root(leaves, 0, old)
    ok_i, t_vi = timed(lambda: verify_inclusion(index, n, leaves[index], path, root), repeat=200)
    ok_c, t_vc = timed(lambda: verify_consistency(old, n, old_root, root, cons), repeat=200)
    print(f"Merkle math over {n:,} entry hashes (synthetic), one core:")
    print(f"  root (streamed)                    {t_root:8.2f} s")
    print(f"  inclusion proof of leaf {index:>7}     {t_incl:8.2f} s  {len(path)} hashes = {32 * len(path)} bytes, "
          f"peak {peak_incl / 1024:.1f} KiB traced")
    print(f"  consistency proof {old:>7} → {n}  {t_cons:8.2f} s  {len(cons)} hashes = {32 * len(cons)} bytes, "
          f"peak {peak_cons / 1024:.1f} KiB traced")
    print(f"  with SubtreeCache (what prove uses): first proof {t_first:.2f} s (hashes every 1024-leaf block "
          f"once), then {t_more / len(others) * 1e3:.2f} ms a proof")
    print(f"  verify inclusion                   {t_vi * 1e6:8.1f} µs  ({'ok' if ok_i else 'FAILED'})")
    print(f"  verify consistency                 {t_vc * 1e6:8.1f} µs  ({'ok' if ok_c else 'FAILED'})")


def cli(*args: object) -> tuple[int, str, float]:
    """Run ``ledger ARGS`` in-process; exit code, stdout, wall seconds."""
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), time.perf_counter() - started


def ledger_part(n: int, seed: int, work: Path) -> None:
    """Part 2: the commands on a real ledger of ``n`` entries."""
    path, pub = work / "L", work / "trainer.pub"
    pub.write_bytes(public_key_pem(SIGNER.public.raw))
    every = max(1, n // 10)
    started = time.perf_counter()
    writer = LedgerWriter.create(path, SIGNER, run_id="bench-proofs", fsync="never")
    for i in range(n - 2):  # genesis and seal make n
        writer.append("checkpoint" if i % every == every - 1 else "step", i,
                      {"metrics": {"loss": 1.0 / (i + 1), "lr": 1e-3}} if i % every != every - 1 else {"path": f"c{i}"})
    writer.seal()
    t_write = time.perf_counter() - started
    heads = list_heads(path)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"\nReal ledger of {n:,} entries ({size / 2**20:.0f} MiB on disk, written in {t_write:.0f} s; "
          f"{len(heads)} signed heads in heads/):")
    rng = random.Random(seed)
    one, ten = [rng.randrange(n)], sorted(rng.sample(range(n), 10))
    rows = []
    for label, seqs in (("1 entry", one), ("10 entries", ten)):
        args = [a for s in seqs for a in ("--seq", s)]
        code, _, t_prove = cli("prove", path, *args, "--out", work / "p.json")
        proof_bytes = (work / "p.json").stat().st_size
        vcode, _, t_verify = cli("verify-proof", work / "p.json", "--key", pub)
        rows.append((f"prove {label}", t_prove, code, proof_bytes))
        rows.append((f"verify-proof {label}", t_verify, vcode, None))
    first = work / "first.note"
    first.write_bytes(heads[0][1])
    code, _, t_cprove = cli("prove", path, "--consistency-from", first, "--out", work / "c.json")
    rows.append((f"prove --consistency-from head {heads[0][0]}", t_cprove, code, (work / "c.json").stat().st_size))
    code, _, t_cverify = cli("verify-proof", work / "c.json", "--key", pub)
    rows.append(("verify-proof (consistency)", t_cverify, code, None))
    code, _, t_cons = cli("consistency", first, path, "--key", pub)
    rows.append(("consistency OLD_HEAD LEDGER", t_cons, code, None))
    for label, seconds, code, nbytes in rows:
        extra = "" if nbytes is None else f"  proof file {nbytes:,} bytes"
        print(f"  {label:<40} {seconds:7.2f} s  exit {code}{extra}")


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="synthetic hashes for part 1")
    parser.add_argument("--ledger", type=int, default=1_000_000, help="entries of the real ledger (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    merkle_part(args.entries, args.seed)
    if args.ledger:
        with tempfile.TemporaryDirectory() as work:
            ledger_part(args.ledger, args.seed, Path(work))


if __name__ == "__main__":
    main_()
