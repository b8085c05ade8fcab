"""Benchmark of the ledger core: append cost, verify throughput and bytes per entry on disk.

Every figure is printed beside its floor measured in the same run (raw Ed25519, SHA-256,
CBOR, a 2-process raw verify) or its target, with the ratio value/floor; no assertions. Entries
look like real training steps: 12 float metrics, 50 per-tensor norms and a 256-float sketch.

    python benchmarks/ledger_core.py                      # defaults, ~1-2 min on 2 cores
    python benchmarks/ledger_core.py --entries 100000 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger import LedgerWriter, PublicKey, Signer
from ledger._parts import list_parts, read_part
from ledger.format import encode_body, pae
from ledger.verify import Options, check_chain, check_seal, check_signatures, load_context, verify_ledger
from ledger.verify._signatures import bad_signatures

SEED = bytes(32)
METRICS = ("loss", "lr", "grad_norm", "grad_norm_clipped", "weight_norm", "update_norm", "loss_scale",
           "tokens_per_s", "samples_per_s", "accuracy", "perplexity", "momentum")
FRAMING = ["seq", "kind", "step", "time_ns", "run_id", "key_id", "hash", "signature"]
SINGLE_CAP = 50_000  # the single-process raw verify rate is measured on at most this many messages
Row = tuple[str, float, str, float | None]  # figure, value, "floor/target" label, floor value
_RAW: tuple[bytes, list[bytes], list[bytes]] | None = None  # set before fork, read by children


def bodies(n: int, seed: int) -> Iterator[dict[str, Any]]:
    """``n`` random training-step bodies, generated in batches."""
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 4096):
        k = min(4096, n - lo)
        metrics = rng.random((k, len(METRICS))).tolist()
        norms = rng.random((k, 50), dtype=np.float32)
        sketch = rng.standard_normal((k, 256), dtype=np.float32)
        for i in range(k):
            yield {"metrics": dict(zip(METRICS, metrics[i], strict=True)), "norms": norms[i], "sketch": sketch[i]}


class NullSigner:
    """Stands in for the writer's Signer: same ``public``, a constant signature (no crypto)."""

    def __init__(self, public: PublicKey) -> None:
        self.public = public

    def sign(self, record: bytes) -> bytes:
        return bytes(64)


def per_op(fn: Callable[[Any], Any], items: Sequence[Any]) -> np.ndarray:
    """Nanoseconds of ``fn(item)`` for each item."""
    clock, out = time.perf_counter_ns, np.empty(len(items), np.int64)
    for i, item in enumerate(items):
        t0 = clock()
        fn(item)
        out[i] = clock() - t0
    return out


def us(ns: np.ndarray) -> tuple[float, float]:
    """Median and p99 in microseconds."""
    return float(np.median(ns)) / 1e3, float(np.percentile(ns, 99)) / 1e3


def timed(fn: Callable[..., Any], *args: Any, repeat: int = 1, **kwargs: Any) -> tuple[float, Any]:
    """Best (least) wall time of ``repeat`` calls, and the last result."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, result


def append_run(root: Path, signer: Signer, items: list[dict[str, Any]], sign: bool) -> tuple[np.ndarray, list[bytes]]:
    """Per-append ns on a fresh ledger (default fsync "group"), and the records written."""
    writer = LedgerWriter.create(root, signer)
    if not sign:
        writer._signer = NullSigner(signer.public)  # type: ignore[assignment]
    clock, times, records = time.perf_counter_ns, np.empty(len(items), np.int64), []
    for step, body in enumerate(items):
        t0 = clock()
        entry = writer.append("step", step, body)
        times[step] = clock() - t0
        records.append(entry.record)
    writer.seal()
    return times, records


def bench_append(tmp: Path, signer: Signer, n: int, seed: int) -> list[Row]:
    items = list(bodies(n, seed))
    signed, records = append_run(tmp / "append-signed", signer, items, sign=True)
    unsigned, _ = append_run(tmp / "append-unsigned", signer, items, sign=False)
    key = Ed25519PrivateKey.from_private_bytes(SEED)
    messages = [pae(r) for r in records]
    floors = {"ed25519 sign(pae)": per_op(key.sign, messages),
              "sha256(record)": per_op(lambda r: hashlib.sha256(r).digest(), records),
              "encode_body(body)": per_op(encode_body, items)}
    print(f"\n== append: {n} step entries, record {np.mean([len(r) for r in records]):.0f} B mean ==")
    print(f"{'operation':34} {'median µs':>10} {'p99 µs':>10} {'max µs':>10}")
    for name, ns in [("append, signed", signed), ("append, constant signature", unsigned), *floors.items()]:
        print(f"{name:34} {us(ns)[0]:10.1f} {us(ns)[1]:10.1f} {ns.max() / 1e3:10.1f}")
    floor_all = sum(us(ns)[0] for ns in floors.values())
    floor_nosign = floor_all - us(floors["ed25519 sign(pae)"])[0]
    print(f"floor sign+sha+cbor {floor_all:.1f} µs; signed/floor {us(signed)[0] / floor_all:.2f}x; "
          f"unsigned/(sha+cbor) {us(unsigned)[0] / floor_nosign:.2f}x; "
          f"signing adds {us(signed)[0] - us(unsigned)[0]:.1f} µs")
    return [("append median µs", us(signed)[0], "target 300", 300.0),
            ("append p99 µs", us(signed)[1], "-", None),
            ("append median µs vs floor sign+sha+cbor", us(signed)[0], f"floor {floor_all:.1f}", floor_all),
            ("append no-sign median µs vs floor sha+cbor", us(unsigned)[0], f"floor {floor_nosign:.1f}", floor_nosign)]


def _raw_verify(lo: int, hi: int) -> None:
    assert _RAW is not None
    key = Ed25519PublicKey.from_public_bytes(_RAW[0])
    for message, signature in zip(_RAW[1][lo:hi], _RAW[2][lo:hi], strict=True):
        key.verify(signature, message)


def raw_rate(public: bytes, messages: list[bytes], signatures: list[bytes], procs: int) -> float:
    """Raw Ed25519 verifies per second: in this process, or in ``procs`` forked processes."""
    global _RAW
    _RAW, n = (public, messages, signatures), len(messages)
    if procs == 1:
        return n / timed(_raw_verify, 0, n)[0]
    ctx, chunk = multiprocessing.get_context("fork"), -(-n // procs)
    children = [ctx.Process(target=_raw_verify, args=(i * chunk, min(n, (i + 1) * chunk))) for i in range(procs)]
    t0 = time.perf_counter()
    for child in children:
        child.start()
    for child in children:
        child.join()
    elapsed = time.perf_counter() - t0
    if any(c.exitcode for c in children):
        print("  warning: a raw verify child failed (bad signature?)")
    _RAW = None
    return n / elapsed


def bench_verify(tmp: Path, signer: Signer, n: int, seed: int, workers: int, repeat: int) -> list[Row]:
    root = tmp / f"verify-{n}"
    writer = LedgerWriter.create(root, signer)
    t_build = time.perf_counter()
    for step, body in enumerate(bodies(n - 2, seed)):
        writer.append("step", step, body)
    writer.seal()
    t_build = time.perf_counter() - t_build
    pub, r = signer.public, repeat
    t_sample, rep_s = timed(verify_ledger, root, key=pub, sample=100, workers=workers, repeat=r)
    t_full, rep_f = timed(verify_ledger, root, key=pub, workers=workers, repeat=r)
    # a fresh context each time: parts are read and every entry hashed again
    t_load, ctx = timed(lambda: load_context(root, Options(workers=workers, sample_seed=0), key=pub), repeat=r)
    stages = {"load": t_load}
    for label, sample in (("sample=100", 100), ("full", None)):
        sampled = replace(ctx, options=replace(ctx.options, sample=sample))
        stages[f"chain {label}"] = timed(check_chain, sampled, repeat=r)[0]
        stages[f"signatures {label}"] = timed(check_signatures, sampled, repeat=r)[0]
    stages["seal"] = timed(check_seal, ctx, repeat=r)[0]
    records, sigs = ctx.loaded.records, ctx.loaded.table["signature"].to_pylist()
    t_stage, bad = timed(bad_signatures, pub.raw, records, sigs, workers=workers, repeat=r)
    messages = [pae(rec) for rec in records]
    raw1 = max(raw_rate(pub.raw, messages[:SINGLE_CAP], sigs[:SINGLE_CAP], 1) for _ in range(r))
    raw2 = max(raw_rate(pub.raw, messages, sigs, workers) for _ in range(r))
    stage_rate = n / t_stage
    print(f"\n== verify: {n} entries (built in {t_build:.1f} s = {t_build / n * 1e6:.0f} µs/entry "
          f"incl. body generation and roll-overs; times: best of {r}) ==")
    print(f"verify sample=100: {t_sample:.3f} s = {n / t_sample:,.0f} entries/s (target 200,000; "
          f"{n / t_sample / 2e5:.2f}x)  verdict {rep_s.verdict}")
    print(f"verify full, workers={workers}: {t_full:.3f} s = {n / t_full:,.0f} entries/s; verdict {rep_f.verdict}")
    full_parts = ["load", "chain full", "signatures full", "seal"]
    sample_parts = ["load", "chain sample=100", "signatures sample=100", "seal"]
    print("breakdown: " + ", ".join(f"{k} {v:.3f}s" for k, v in stages.items()))
    sum_full, sum_sample = (sum(stages[k] for k in parts) for parts in (full_parts, sample_parts))
    print(f"  sum full {sum_full:.3f}s (rest of verify_ledger {t_full - sum_full:.3f}s), "
          f"sum sample=100 {sum_sample:.3f}s (rest {t_sample - sum_sample:.3f}s)")
    print(f"signature stage (bad_signatures, {len(bad)} bad): {t_stage:.3f} s = {stage_rate:,.0f}/s; raw Ed25519 "
          f"1 proc {raw1:,.0f}/s, {workers} procs {raw2:,.0f}/s (speedup {raw2 / raw1:.2f}); "
          f"stage/raw-{workers}-proc {stage_rate / raw2:.2f} "
          f"(target 0.90); full verify/raw-{workers}-proc {n / t_full / raw2:.2f}")
    return [(f"verify sample=100 entries/s, n={n}", n / t_sample, "target 200000", 2e5),
            (f"verify full entries/s, n={n}", n / t_full, f"raw {workers}-proc {raw2:,.0f}", raw2),
            (f"signature stage/raw {workers}-proc, n={n}", stage_rate / raw2, "target 0.90", 0.90)]


def write_like_part(table: pa.Table, path: Path, columns: dict[str, int]) -> int:
    """Write with ledger._parts.write_part's Parquet settings; returns the file size and adds
    each column's compressed size to ``columns``."""
    names = table.column_names
    pq.write_table(table, path, compression="zstd", row_group_size=65536,
                   use_dictionary=[c for c in ("kind", "run_id", "key_id") if c in names],
                   write_statistics=[c for c in ("seq", "step", "time_ns") if c in names])
    meta = pq.ParquetFile(path).metadata
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            columns[name] = columns.get(name, 0) + col.total_compressed_size
    return path.stat().st_size


def bench_bytes(tmp: Path, root: Path, n: int) -> list[Row]:
    """Bytes per entry in the parts, split into framing and body by rewriting each part twice."""
    total = framing = body = raw_body = 0
    cols: dict[str, int] = {}
    for part in list_parts(root / "parts"):
        total += part.stat().st_size
        table = read_part(part)
        record = table["record"]
        raw_body += pc.sum(pc.binary_length(record)).as_py() - 92 * table.num_rows
        frame_t = table.select(FRAMING).append_column("header", pc.binary_slice(record, 0, 92))
        body_t = table.select(["metrics"]).append_column("body", pc.binary_slice(record, 92, 1 << 30))
        framing += write_like_part(frame_t, tmp / "framing.parquet", cols)
        body += write_like_part(body_t, tmp / "body.parquet", cols)
    print(f"\n== bytes on disk: {n} entries ==")
    print(f"parts total {total / n:.1f} B/entry; framing {framing / n:.1f} (target 160), body {body / n:.1f} "
          f"(uncompressed CBOR body {raw_body / n:.1f}); split sum {(framing + body) / n:.1f}")
    print("compressed column bytes/entry: " + ", ".join(f"{k} {v / n:.1f}" for k, v in
                                                        sorted(cols.items(), key=lambda kv: -kv[1])))
    return [("part bytes/entry", total / n, "-", None),
            ("framing bytes/entry", framing / n, "target 160", 160.0),
            ("body bytes/entry vs uncompressed CBOR", body / n, f"raw {raw_body / n:.0f}", raw_body / n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000, 50_000],
                        help="ledger sizes for the verify and bytes benchmarks (e.g. 100000 1000000)")
    parser.add_argument("--appends", type=int, default=10_000,
                        help="entries timed in the append benchmark (a roll-over every 8192)")
    parser.add_argument("--workers", type=int, default=2, help="verify processes (and raw verify processes)")
    parser.add_argument("--repeat", type=int, default=3, help="verify timings: best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    signer = Signer.from_seed(SEED)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as name:
        tmp = Path(name)
        rows += bench_append(tmp, signer, args.appends, args.seed)
        for n in args.entries:
            rows += bench_verify(tmp, signer, n, args.seed + n, args.workers, args.repeat)
            rows += bench_bytes(tmp, tmp / f"verify-{n}", n)
    print("\n== summary ==")
    print(f"{'figure':48} {'value':>12}  {'floor/target':24} {'value/floor':>11}")
    for figure, value, label, floor in rows:
        ratio = f"{value / floor:11.2f}" if floor else f"{'-':>11}"
        print(f"{figure:48} {value:12,.2f}  {label:24} {ratio}")


if __name__ == "__main__":
    main()
