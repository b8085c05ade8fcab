"""Mutate every cell of a signed ledger, one at a time, and verify each mutant.

A 1,000-entry ledger (several Parquet parts and a log tail) is written with a fixed key; then, for
every row and every column of every part, one value is changed (a byte flipped in binary columns, an
integer moved by one, a string or metrics map altered) and the part rewritten in place, and every
frame of the log has one byte flipped. Each mutant is verified in-process with the trainer's key.
Outcomes: ``detected`` (verdict fail, the report names the damage), ``tail-dropped`` (the last
frame of an unsealed ledger's log: indistinguishable from a write torn by a crash, so it is dropped
and reported as ``torn_tail_bytes``; cutting an unsealed ledger short is undetectable without an
external anchor, see docs/SECURITY.md), ``missed`` (verdict pass or warn: a soundness bug),
``crashed`` (anything raised: a totality bug). The original part is put back after
each case, so the cases are independent.

    python benchmarks/mutation_campaign.py                 # every cell (about 10,000 cases)
    python benchmarks/mutation_campaign.py --cells 300     # a random sample of cells

The last line printed is one JSON object with the counts (benchmarks/reliability.py reads it).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ledger import LedgerWriter, PublicKey, Signer
from ledger.verify import verify_ledger

SEED = bytes(range(32))


def build(path: Path, entries: int, rollover: int) -> Signer:
    signer = Signer.from_seed(SEED)
    clock = iter(range(1_767_225_600_000_000_000, 1 << 62, 1_000_000))
    writer = LedgerWriter.create(path, signer, genesis={"config": {"lr": 1e-3}}, rollover_entries=rollover,
                                 clock=lambda: next(clock), fsync="never")
    rng = np.random.default_rng(0)
    for i in range(entries - 2):
        writer.append("step", i, {"metrics": {"loss": 1.0 / (i + 1), "lr": 1e-3},
                                  "norms": rng.random(4).astype(np.float32)})
    writer.seal()
    return signer


def mutate_value(column: str, value: Any, rng: random.Random) -> Any:
    """A different value of the same type."""
    if isinstance(value, bytes):
        data = bytearray(value)
        if not data:
            return b"\x00"
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice((-1, 1))
    if isinstance(value, str):
        return value + "x" if column != "kind" else ("step" if value != "step" else "checkpoint")
    if isinstance(value, list):  # metrics map as (key, value) pairs
        if not value:
            return [("loss", 0.5)]
        key, number = value[rng.randrange(len(value))]
        return [(k, (v * 1.0000001 + 1e-12) if k == key else v) for k, v in value]
    raise TypeError(f"no mutation for {column}={value!r}")


def verdict_of(path: Path, key: PublicKey) -> str:
    try:
        report = verify_ledger(path, key=key, replay=0)
    except Exception:  # noqa: BLE001 - the campaign counts every exception as a totality bug
        return "crashed:" + traceback.format_exc().strip().splitlines()[-1]
    if report.verdict == "fail":
        return "detected"
    if report.ledger.get("torn_tail_bytes") and not report.ledger.get("sealed"):
        return "tail-dropped"  # an unsealed ledger's damaged last frame reads as a crash's torn write
    return "missed"


def part_cases(root: Path, key: PublicKey, cells: int | None, rng: random.Random) -> list[tuple[str, str]]:
    cases = []
    for part in sorted((root / "parts").glob("*.parquet")):
        table = pq.read_table(part)
        original = part.read_bytes()
        every = [(r, c) for r in range(table.num_rows) for c in table.column_names]
        cases.extend((part, r, c) for r, c in every)
        del original
    chosen = cases if cells is None else rng.sample(cases, min(cells, len(cases)))
    out = []
    for part, row, column in chosen:
        original = part.read_bytes()
        table = pq.read_table(part)
        values = table[column].to_pylist()
        values[row] = mutate_value(column, values[row], rng)
        index = table.schema.get_field_index(column)
        mutated = table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))
        pq.write_table(mutated, part, compression="zstd")
        try:
            out.append((f"{part.name} row {row} {column}", verdict_of(root, key)))
        finally:
            part.write_bytes(original)
    return out


def wal_cases(root: Path, key: PublicKey, rng: random.Random) -> list[tuple[str, str]]:
    from ledger import _wal

    wal = root / "wal.log"
    original = wal.read_bytes()
    scan = _wal.scan(original)
    out = []
    pos = len(_wal.MAGIC)
    for entry in scan.entries:
        size = _wal.FRAME.size + len(entry.key_id) + len(entry.signature) + len(entry.record)
        data = bytearray(original)
        data[pos + rng.randrange(size)] ^= 1 << rng.randrange(8)
        wal.write_bytes(bytes(data))
        try:
            out.append((f"wal.log frame at byte {pos}", verdict_of(root, key)))
        finally:
            wal.write_bytes(original)
        pos += size
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--cells", type=int, default=None, help="a random sample of this many part cells")
    parser.add_argument("--seed", type=int, default=20261130)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ledger"
        signer = build(root, args.entries, rollover=max(2, args.entries // 3))
        key = signer.public
        started = time.perf_counter()
        base = verdict_of(root, key)
        if base != "missed":
            print(f"the unmutated ledger does not pass ({base}); nothing to measure", file=sys.stderr)
            return 2
        results = part_cases(root, key, args.cells, rng)
        wal_root = Path(tmp) / "open"
        build_open(wal_root)
        results += wal_cases(wal_root, key, rng)
        seconds = time.perf_counter() - started
    counts: dict[str, int] = {"cases": len(results), "detected": 0, "tail-dropped": 0, "missed": 0, "crashed": 0}
    for name, outcome in results:
        kind = outcome.split(":", 1)[0]
        counts[kind] += 1
        if kind in ("missed", "crashed"):
            print(f"{kind}: {name} {outcome.split(':', 1)[1] if ':' in outcome else ''}")
    print(json.dumps({"campaign": "mutation", "entries": args.entries, **counts, "seconds": round(seconds, 1)}))
    return 0 if counts["missed"] == counts["crashed"] == 0 else 1


CRASHED_WRITER = """
import os, sys
from ledger import LedgerWriter, Signer
writer = LedgerWriter.create(sys.argv[1], Signer.from_seed(bytes(range(32))), genesis={"config": {}},
                             rollover_entries=1 << 16, fsync="never")
for i in range(50):
    writer.append("step", i, {"metrics": {"loss": 1.0 / (i + 1)}})
os._exit(0)  # a crash: the entries stay in the log, never rolled into a part
"""


def build_open(path: Path) -> None:
    """A ledger whose 51 entries are all still in the log (a crashed, unsealed run)."""
    subprocess.run([sys.executable, "-c", CRASHED_WRITER, str(path)], check=True)


if __name__ == "__main__":
    sys.exit(main())
