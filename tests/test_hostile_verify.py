"""verify is total on hostile content (issue #10): every damaged, crafted or unusable input — record
bytes, re-signed bodies, parts, the log, the manifest, checkpoint files, the weights, the index,
``--against``, ``--key``, ``--recipe`` — ends in a report with a failed check naming the seq or file
(exit 1) or in one line saying what cannot be used (exit 2): never a traceback, an internal error, a
hang, or a changed file.

Each case copies tests/data/stored-run (a real recorded run with checkpoints), damages it, and runs
the real CLI: in this process (``ledger._cli.main``, under a 10 s alarm) or, when a FIFO or a device
could block, as a subprocess with a 10 s timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import stat
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FIXED_SEED

import ledger
from ledger import Signer
from ledger._cli import main
from ledger._encoding import encode_body
from ledger._entry import Entry
from ledger._parts import entries_table
from ledger._record import HEADER_OFFSETS, HEADER_SIZE, Header, Kind, encode_record, entry_hash, merkle_root
from ledger.verify import CHECK_NAMES

STORED = Path(__file__).parent / "data" / "stored-run"
SIGNER = Signer.from_seed(FIXED_SEED)
PART = Path("ledger/parts/000000.parquet")
TIMEOUT = 10.0
STEP_ROW, GENESIS_ROW, SEAL_ROW, CKPT_ROW = 5, 0, 24, 12  # seq 12: the checkpoint at step 9


# ----------------------------------------------------------------------------- running the CLI
@dataclass(frozen=True)
class Outcome:
    code: int | str
    out: str
    err: str


def run_inproc(args: list[str]) -> Outcome:
    """``ledger ARGS`` in this process, killed by SIGALRM after TIMEOUT seconds."""
    out, err = io.StringIO(), io.StringIO()

    def alarm(*_: Any) -> None:
        raise TimeoutError("hang")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    code: int | str
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
            except TimeoutError:
                code = "timeout"
            except BaseException:  # what escaped the CLI: a traceback a user would see
                traceback.print_exc(file=err)
                code = "raised"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome(code, out.getvalue(), err.getvalue())


def run_subprocess(args: list[str]) -> Outcome:
    """``python -m ledger ARGS`` with a TIMEOUT-second limit (for FIFOs and devices)."""
    try:
        done = subprocess.run([sys.executable, "-m", "ledger", *args], capture_output=True, text=True,
                              timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return Outcome("timeout", str(exc.stdout or ""), str(exc.stderr or ""))
    return Outcome(done.returncode, done.stdout, done.stderr)


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under ``root``: kind, and for regular files the SHA-256 and mtime."""
    state: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_size > 64 << 20:  # a sparse huge file: not read
                state[str(path)] = ("file", info.st_size, info.st_mtime_ns)
            elif stat.S_ISREG(info.st_mode):
                state[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mtime_ns)
            else:
                state[str(path)] = (stat.S_IFMT(info.st_mode), os.readlink(path) if path.is_symlink() else None)
    return state


# ----------------------------------------------------------------------------- damaging a copy
def read_part(ws: Path) -> pa.Table:
    return pq.read_table(ws / PART)


def write_table(ws: Path, table: pa.Table) -> None:
    pq.write_table(table, ws / PART, compression="zstd")


def set_record(ws: Path, row: int, change: Callable[[bytes], bytes]) -> None:
    """Replace one record cell (the other columns, hashes and signatures left as they were)."""
    table = read_part(ws)
    records = table["record"].to_pylist()
    records[row] = change(records[row])
    index = table.schema.get_field_index("record")
    write_table(ws, table.set_column(index, table.schema.field(index), pa.array(records, pa.binary())))


def set_records(ws: Path, rows: range, change: Callable[[bytes], bytes]) -> None:
    for row in rows:
        set_record(ws, row, change)


def header_set(field: str, value: int | bytes) -> Callable[[bytes], bytes]:
    offset, size = HEADER_OFFSETS[field]
    raw = value if isinstance(value, bytes) else value.to_bytes(size, "big", signed=field in ("step", "time_ns"))
    return lambda r: r[:offset] + raw + r[offset + size:]


def resign(ws: Path, change: Callable[[int, Kind, int, dict[str, Any]], Any]) -> None:
    """The trainer re-writes every entry with the fixture's key: links, hashes, signatures and the
    seal's count, head and Merkle root are valid, so what is tested is the body validation.
    ``change(seq, kind, step, body)`` returns the new body (a dict or raw CBOR bytes) or a
    ``(kind, step, body)`` triple."""
    entries = list(ledger.open(STORED / "ledger").entries())
    genesis = entries[0].body()
    run_id = genesis["run_id"]
    prev, hashes, out, metrics = bytes(32), [], [], []
    for entry in entries:
        header = entry.header
        body = entry.body()
        kind, step = header.kind, header.step
        if kind is Kind.SEAL:
            body = {**body, "entry_count": len(hashes), "head": prev, "tree_root": merkle_root(hashes)}
        changed = change(header.seq, kind, step, body)
        if isinstance(changed, tuple):
            kind, step, changed = changed
        raw = changed if isinstance(changed, bytes) else _encode(changed)
        record = encode_record(Header(1, kind, header.seq, step, header.time_ns, header.run_digest, prev), raw)
        out.append(Entry(record=record, signature=SIGNER.sign(record), key_id=SIGNER.public.key_id))
        prev = entry_hash(record)
        hashes.append(prev)
        m = changed.get("metrics") if isinstance(changed, dict) else None
        metrics.append({k: float(v) for k, v in m.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)} if isinstance(m, dict) else {})
    table = entries_table(out, run_id, metrics)
    write_table(ws, table.replace_schema_metadata(read_part(ws).schema.metadata))


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return encode_body(body)
    except ledger.ConfigurationError:
        return cbor2.dumps(body, canonical=True)


def at(row: int, field: str, value: Any, *, kind: Kind | None = None) -> Callable[[Path], None]:
    """Re-signed: entry ``row``'s body field ``field`` set to ``value`` (deleted for ``...``)."""
    def change(seq: int, k: Kind, step: int, body: dict[str, Any]) -> Any:
        if seq != row:
            return body
        body = dict(body)
        if value is ...:
            body.pop(field, None)
        else:
            body[field] = value
        return (kind, step, body) if kind is not None else body
    return lambda ws: resign(ws, change)


def body_of(row: int, new: Any, *, kind: Kind | None = None, step: int | None = None) -> Callable[[Path], None]:
    """Re-signed: entry ``row``'s whole body replaced (a dict, or raw bytes), optionally its kind/step."""
    def change(seq: int, k: Kind, s: int, body: dict[str, Any]) -> Any:
        if seq != row:
            return body
        return (kind or k, s if step is None else step, new)
    return lambda ws: resign(ws, change)


def sub(row: int, field: str, key: str, value: Any) -> Callable[[Path], None]:
    """Re-signed: ``body[field][key] = value`` at entry ``row``."""
    def change(seq: int, k: Kind, s: int, body: dict[str, Any]) -> Any:
        if seq == row:
            body = dict(body)
            body[field] = {**body[field], key: value}
        return body
    return lambda ws: resign(ws, change)


def checkpoint_dir(ws: Path, row: int = CKPT_ROW) -> Path:
    entry = list(ledger.open(STORED / "ledger").entries())[row]
    return ws / "ledger" / entry.body()["path"]


def make_fifo(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    os.mkfifo(path)


def replace_with(path: Path, data: bytes | None = None, *, kind: str = "bytes") -> None:
    """Replace ``path`` by bytes, a directory, a FIFO, a symlink to /dev/zero or to a /proc file, or a
    sparse huge file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "proc":  # a kernel pseudo-file: regular, size 0, yet it reads (never /proc/kmsg: reading consumes it)
        path.symlink_to("/proc/self/status")
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(3 << 30)  # sparse: 3 GiB declared, nothing on disk
    else:
        path.write_bytes(data or b"")


def safetensors_bytes(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def unseal(ws: Path) -> None:
    table = read_part(ws)
    write_table(ws, table.slice(0, table.num_rows - 1))


PICKLE = pickle.dumps({"weight": list(range(10))}, protocol=4)
GARBAGE = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
NESTED = b"\xa1\x61x" + b"\x81" * 100_000 + b"\x00"  # {"x": [[[[…]]]]}, 100 000 deep
HUGE_LENGTH = b"\xa1\x61x\x5b" + (1 << 62).to_bytes(8, "big")  # {"x": <bytes of 2**62>}, none given
HUGE_MAP = b"\xbb" + (1 << 62).to_bytes(8, "big")  # a map of 2**62 pairs, none given


# ----------------------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Any]  # damages the workspace; may return extra/replacement CLI args
    code: int = 1  # 1: bad ledger content (a report), 2: an unusable input (one line), 0: a warning
    names: str = ""  # what the output must name (a seq, a file)
    subprocess: bool = False


def case(name: str, make: Callable[[Path], Any], code: int = 1, names: str = "", *, sub_: bool = False) -> Case:
    return Case(name, make, code, names, sub_)




def rec(row: int, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    return lambda ws: set_record(ws, row, change)


RECORDS = [
    case("version-2-step", rec(STEP_ROW, header_set("version", 2)), 1, "seq 5"),
    case("version-2-genesis", rec(GENESIS_ROW, header_set("version", 2)), 1, "seq 0"),
    case("version-2-seal", rec(SEAL_ROW, header_set("version", 2)), 1, "seq 24"),
    # every record newer: not judged, one line and exit 2 (FORMAT.md §9)
    case("version-2-every-record", lambda ws: set_records(ws, range(25), header_set("version", 2)), 2, "upgrade"),
    case("version-0xffff-step", rec(STEP_ROW, header_set("version", 0xFFFF)), 1, "seq 5"),
    case("cut-to-50-step", rec(STEP_ROW, lambda r: r[:50]), 1, "seq 5"),
    case("cut-to-0-step", rec(STEP_ROW, lambda r: b""), 1, "seq 5"),
    case("cut-to-91-step", rec(STEP_ROW, lambda r: r[:91]), 1, "seq 5"),
    case("header-only-step", rec(STEP_ROW, lambda r: r[:HEADER_SIZE]), 1, "seq 5"),
    case("cut-to-50-genesis", rec(GENESIS_ROW, lambda r: r[:50]), 1, "seq 0"),
    case("cut-to-50-seal", rec(SEAL_ROW, lambda r: r[:50]), 1, "seq 24"),
    case("cut-to-50-checkpoint", rec(CKPT_ROW, lambda r: r[:50]), 1, "seq 12"),
    case("kind-7", rec(STEP_ROW, header_set("kind", 7)), 1, "seq 5"),
    case("kind-255", rec(STEP_ROW, header_set("kind", 255)), 1, "seq 5"),
    case("kind-genesis-mid", rec(STEP_ROW, header_set("kind", 0)), 1, "seq 5"),
    case("kind-seal-mid", rec(STEP_ROW, header_set("kind", 6)), 1, "seq 5"),
    case("kind-checkpoint-on-step", rec(STEP_ROW, header_set("kind", 2)), 1, "seq 5"),
    case("kind-step-on-genesis", rec(GENESIS_ROW, header_set("kind", 1)), 1, "seq 0"),
    case("reserved-1", rec(STEP_ROW, header_set("reserved", 1)), 1, "seq 5"),
    case("seq-max", rec(STEP_ROW, header_set("seq", (1 << 64) - 1)), 1, "seq 5"),
    case("step-min", rec(STEP_ROW, header_set("step", -(1 << 63))), 1, "seq 5"),
    case("step-max", rec(STEP_ROW, header_set("step", (1 << 63) - 1)), 1, "seq 5"),
    case("time-negative", rec(STEP_ROW, header_set("time_ns", -1)), 1, "seq 5"),
    case("run-digest-flipped", rec(STEP_ROW, header_set("run_digest", bytes(32))), 1, "seq 5"),
    case("prev-hash-zero", rec(STEP_ROW, header_set("prev_hash", bytes(32))), 1, "seq 5"),
    case("body-0xff", rec(STEP_ROW, lambda r: r[:HEADER_SIZE] + b"\xff"), 1, "seq 5"),
    case("body-half", rec(STEP_ROW, lambda r: r[:HEADER_SIZE + (len(r) - HEADER_SIZE) // 2]), 1, "seq 5"),
    case("body-trailing-byte", rec(STEP_ROW, lambda r: r + b"\x00"), 1, "seq 5"),
    case("body-nested-deep", rec(STEP_ROW, lambda r: r[:HEADER_SIZE] + NESTED), 1, "seq 5"),
    case("body-huge-length", rec(STEP_ROW, lambda r: r[:HEADER_SIZE] + HUGE_LENGTH), 1, "seq 5"),
    case("genesis-body-garbage", rec(GENESIS_ROW, lambda r: r[:HEADER_SIZE] + GARBAGE), 1, "seq 0"),
    case("seal-body-garbage", rec(SEAL_ROW, lambda r: r[:HEADER_SIZE] + GARBAGE), 1, "seq 24"),
]

CRAFTED = [
    case("step-norms-string", at(STEP_ROW, "norms", "x"), 1, "seq 5"),
    case("step-norms-short", at(STEP_ROW, "norms", np.ones(3, np.float32)), 1, "seq 5"),
    case("step-norms-2d", at(STEP_ROW, "norms", [[1.0, 2.0], [3.0, 4.0]]), 1, "seq 5"),
    case("step-sketch-short", at(STEP_ROW, "sketch", np.ones(3)), 1, "seq 5"),
    case("step-sketch-string", at(STEP_ROW, "sketch", "x"), 1, "seq 5"),
    case("step-lrs-empty", at(STEP_ROW, "lrs", []), 1, "seq 5"),
    case("step-lrs-string", at(STEP_ROW, "lrs", "fast"), 1, "seq 5"),
    case("step-metrics-list", at(STEP_ROW, "metrics", [1, 2]), 1, "seq 5"),
    case("step-loss-string", sub(STEP_ROW, "metrics", "loss", "low"), 1, "seq 5"),
    case("step-tensor-digests-short", at(STEP_ROW, "tensor_digests", b"short"), 1, "seq 5"),
    case("step-model-digest-int", at(STEP_ROW, "model_digest", 5), 1, "seq 5"),
    case("step-batch-digest-int", at(STEP_ROW, "batch_digest", 5), 1, "seq 5"),
    case("step-optimizer-steps-negative", at(STEP_ROW, "optimizer_steps", -1), 1, "seq 5"),
    case("step-optimizer-steps-string", at(STEP_ROW, "optimizer_steps", "one"), 1, "seq 5"),
    case("step-carries-int", at(STEP_ROW, "carries", 7), 1, "seq 5"),
    case("step-grad-norms-huge-list", at(STEP_ROW, "grad_norms", [1.0] * 100_000), 1, "seq 5"),
    case("step-empty-body", body_of(STEP_ROW, {}), 1, "seq 5"),
    case("step-body-not-a-map", body_of(STEP_ROW, cbor2.dumps([1, 2, 3])), 1, "seq 5"),
    case("step-body-deep", body_of(STEP_ROW, NESTED), 1, "seq 5"),
    case("step-body-huge-map", body_of(STEP_ROW, HUGE_MAP), 1, "seq 5"),
    case("step-far-future", lambda ws: resign(ws, lambda q, k, s, b: (k, (1 << 62) if q == 22 else s, b)),
         1, str(1 << 62)),
    case("checkpoint-state-digest-short", at(CKPT_ROW, "state_digest", b"xxxxx"), 1, "seq 12"),
    case("checkpoint-path-traversal", at(CKPT_ROW, "path", "../../../../../../etc"), 1, "seq 12"),
    case("checkpoint-path-int", at(CKPT_ROW, "path", 3), 1, "seq 12"),
    case("checkpoint-tensor-digests-list", at(CKPT_ROW, "tensor_digests", [b"x"]), 1, "seq 12"),
    case("checkpoint-hyper-string", at(CKPT_ROW, "optimizer_hyper", "x"), 1, "seq 12"),
    case("checkpoint-missing-model-digest", at(CKPT_ROW, "model_digest", ...), 1, "seq 12"),
    case("seal-final-string", at(SEAL_ROW, "final", "x"), 1, "seq 24"),
    case("seal-final-digest-int", sub(SEAL_ROW, "final", "tensor_digests", {"up.weight": 5}), 1, "seq 24"),
    case("seal-entry-count-string", at(SEAL_ROW, "entry_count", "x"), 1, "seq 24"),
    case("seal-steps-negative", at(SEAL_ROW, "steps", -5), 1, "seq 24"),
    case("genesis-init-string", at(GENESIS_ROW, "init", "x"), 1, "seq 0"),
    case("genesis-init-norms-short", sub(GENESIS_ROW, "init", "norms", np.ones(2)), 1, "seq 0"),
    case("genesis-fingerprints-empty", at(GENESIS_ROW, "fingerprints", {}), 1, "seq 0"),
    case("genesis-sketch-k-huge", sub(GENESIS_ROW, "fingerprints", "sketch_k", 1 << 40), 1, "seq 0"),
    case("genesis-optimizer-groups-string", sub(GENESIS_ROW, "optimizer", "param_groups", "x"), 1, "seq 0"),
    case("genesis-run-id-int", at(GENESIS_ROW, "run_id", 5), 1, "seq 0"),
    case("genesis-seed-string", at(GENESIS_ROW, "seed", "x"), 1, "seq 0"),
    case("genesis-architecture-int", at(GENESIS_ROW, "architecture", 5), 1, "seq 0"),
    case("genesis-checkpoint-every-zero", at(GENESIS_ROW, "checkpoint_every", 0), 1, "seq 0"),
    case("resume-huge-span", body_of(STEP_ROW, {"superseded": {"first_seq": 0, "last_seq": 1 << 62}},
                                     kind=Kind.RESUME), 1, "seq 5"),
    case("resume-span-string", body_of(STEP_ROW, {"superseded": "all"}, kind=Kind.RESUME), 1, "seq 5"),
    case("prune-digest-int", body_of(STEP_ROW, {"state_digest": 5}, kind=Kind.PRUNE), 1, "seq 5"),
    case("eval-garbage-metrics", body_of(STEP_ROW, {"metrics": {"acc": "high"}}, kind=Kind.EVAL), 1, "seq 5"),
]


def other_schema(ws: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2, 3]}), ws / PART)


def empty_ledger_table(ws: Path) -> None:
    write_table(ws, read_part(ws).slice(0, 0))


def record_as_large_binary(ws: Path) -> None:
    table = read_part(ws)
    index = table.schema.get_field_index("record")
    write_table(ws, table.set_column(index, pa.field("record", pa.large_binary()),
                                     table["record"].cast(pa.large_binary())))


def many_rows_tiny_part(ws: Path) -> None:
    table = read_part(ws)
    write_table(ws, pa.concat_tables([table.slice(5, 1)] * 20_000))


def huge_manifest(ws: Path) -> None:
    unseal(ws)
    replace_with(ws / "ledger/manifest.json", kind="huge")


PARTS = [
    case("part-garbage", lambda ws: (ws / PART).write_bytes(GARBAGE), 1, "000000.parquet"),
    case("part-empty-file", lambda ws: (ws / PART).write_bytes(b""), 1, "000000.parquet"),
    case("part-directory", lambda ws: replace_with(ws / PART, kind="dir"), 1, "000000.parquet"),
    case("part-fifo", lambda ws: replace_with(ws / PART, kind="fifo"), 1, "000000.parquet", sub_=True),
    case("part-dev-zero", lambda ws: replace_with(ws / PART, kind="zero"), 1, "000000.parquet", sub_=True),
    case("part-huge-sparse", lambda ws: replace_with(ws / PART, kind="huge"), 1, "000000.parquet", sub_=True),
    case("part-other-schema", other_schema, 1, "000000.parquet"),
    case("part-zero-rows", empty_ledger_table, 1, "000000.parquet"),
    case("part-large-binary-records", record_as_large_binary, 1, "000000.parquet"),
    case("part-truncated", lambda ws: (ws / PART).write_bytes((ws / PART).read_bytes()[:3000]), 1, "000000.parquet"),
    case("part-duplicated", lambda ws: shutil.copy(ws / PART, ws / "ledger/parts/000001.parquet"), 1, "seq 24"),
    case("part-many-identical-rows", many_rows_tiny_part, 1, "000000.parquet"),
    case("wal-fifo", lambda ws: replace_with(ws / "ledger/wal.log", kind="fifo"), 1, "wal.log", sub_=True),
    case("wal-dev-zero", lambda ws: replace_with(ws / "ledger/wal.log", kind="zero"), 1, "wal.log", sub_=True),
    # size 0 by its own account: an empty log, never read (the sealed ledger is whole in its parts)
    case("wal-proc", lambda ws: replace_with(ws / "ledger/wal.log", kind="proc"), 0, sub_=True),
    case("wal-garbage", lambda ws: (ws / "ledger/wal.log").write_bytes(GARBAGE), 1, "wal.log"),
    case("wal-directory", lambda ws: replace_with(ws / "ledger/wal.log", kind="dir"), 1, "wal.log"),
    case("wal-huge-sparse", lambda ws: replace_with(ws / "ledger/wal.log", kind="huge"), 1, "wal.log", sub_=True),
    case("manifest-huge-unsealed", huge_manifest, 0, "", sub_=True),
    case("manifest-fifo-unsealed", lambda ws: (unseal(ws), replace_with(ws / "ledger/manifest.json", kind="fifo")),
         0, "", sub_=True),
    case("manifest-list-unsealed", lambda ws: (unseal(ws), (ws / "ledger/manifest.json").write_text("[1, 2]")), 0),
    case("manifest-garbage-unsealed", lambda ws: (unseal(ws), (ws / "ledger/manifest.json").write_bytes(GARBAGE)), 0),
]


def ckpt(name: str, data: bytes | None = None, kind: str = "bytes") -> Callable[[Path], None]:
    return lambda ws: replace_with(checkpoint_dir(ws) / name, data, kind=kind)


def truncated(name: str) -> Callable[[Path], None]:
    def make(ws: Path) -> None:
        path = checkpoint_dir(ws) / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return make


CKPT_NAME = "dd61d2a93ccff4ef0c0f144c8f4fb9f9261f0e9c2c51dba1412d2fc81bb51f5d"
CHECKPOINTS = [
    case("ckpt-model-garbage", ckpt("model.safetensors", GARBAGE), 1, "step 9"),
    case("ckpt-model-truncated", truncated("model.safetensors"), 1, "step 9"),
    case("ckpt-model-pickle", ckpt("model.safetensors", PICKLE), 1, "step 9"),
    case("ckpt-model-empty", ckpt("model.safetensors", b""), 1, "step 9"),
    case("ckpt-model-header-huge", ckpt("model.safetensors", safetensors_bytes({}, length=1 << 60)), 1, "step 9"),
    case("ckpt-model-header-list", ckpt("model.safetensors", safetensors_bytes([1, 2])), 1, "step 9"),
    case("ckpt-model-bad-dtype", ckpt("model.safetensors", safetensors_bytes(
        {"up.weight": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))), 1, "step 9"),
    case("ckpt-model-negative-shape", ckpt("model.safetensors", safetensors_bytes(
        {"up.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4))), 1, "step 9"),
    case("ckpt-model-offsets-outside", ckpt("model.safetensors", safetensors_bytes(
        {"up.weight": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}})), 1, "step 9"),
    case("ckpt-model-directory", ckpt("model.safetensors", kind="dir"), 1, "step 9"),
    case("ckpt-model-dev-zero", ckpt("model.safetensors", kind="zero"), 1, "step 9", sub_=True),
    case("ckpt-model-fifo", ckpt("model.safetensors", kind="fifo"), 1, "step 9", sub_=True),
    case("ckpt-optimizer-garbage", ckpt("optimizer.safetensors", GARBAGE), 1, "step 9"),
    case("ckpt-state-garbage", ckpt("state.cbor", GARBAGE), 1, "step 9"),
    case("ckpt-state-truncated", truncated("state.cbor"), 1, "step 9"),
    case("ckpt-state-pickle", ckpt("state.cbor", PICKLE), 1, "step 9"),
    case("ckpt-state-deep", ckpt("state.cbor", NESTED), 1, "step 9"),
    case("ckpt-state-fifo", ckpt("state.cbor", kind="fifo"), 1, "step 9", sub_=True),
    case("ckpt-state-proc", ckpt("state.cbor", kind="proc"), 1, "step 9", sub_=True),
    case("ckpt-dir-is-a-file", lambda ws: replace_with(checkpoint_dir(ws), b"x"), 0),
]


def with_model(make: Callable[[Path], Path]) -> Callable[[Path], dict[str, str]]:
    return lambda ws: {"--model": str(make(ws))}


def write(ws: Path, name: str, data: bytes | str) -> Path:
    path = ws / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def special(ws: Path, name: str, kind: str) -> Path:
    path = ws / name
    replace_with(path, kind=kind)
    return path


def index(weight_map: Any) -> Callable[[Path], Path]:
    return lambda ws: write(ws, "model.safetensors.index.json", json.dumps({"weight_map": weight_map}))


def against(make: Callable[[Path], Path]) -> Callable[[Path], dict[str, str]]:
    return lambda ws: {"--against": str(make(ws))}


def key(make: Callable[[Path], Path]) -> Callable[[Path], dict[str, str]]:
    return lambda ws: {"--key": str(make(ws))}


def recipe(source: str) -> Callable[[Path], dict[str, str]]:
    return lambda ws: {"--recipe": f"{write(ws, 'recipe.py', source)}:recipe"}


def compare(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    return lambda ws: ["compare", str(ws / "model.safetensors"), str(make(ws))]


GOOD_SHAPE = {"up.weight": {"dtype": "F32", "shape": [16, 8], "data_offsets": [0, 512]}}
INPUTS = [
    case("model-garbage", with_model(lambda ws: write(ws, "m.safetensors", GARBAGE)), 1, "m.safetensors"),
    case("model-pickle", with_model(lambda ws: write(ws, "m.safetensors", PICKLE)), 1, "m.safetensors"),
    case("model-header-huge", with_model(lambda ws: write(ws, "m.safetensors", safetensors_bytes({}, length=1 << 62))),
         1, "m.safetensors"),
    case("model-header-not-json", with_model(lambda ws: write(ws, "m.safetensors", safetensors_bytes(b"\xff{"))),
         1, "m.safetensors"),
    case("model-header-metadata-only", with_model(lambda ws: write(ws, "m.safetensors",
                                                                   safetensors_bytes({"__metadata__": 5}))),
         1, "m.safetensors"),
    case("model-tensor-info-string", with_model(lambda ws: write(ws, "m.safetensors",
                                                                 safetensors_bytes({"up.weight": "x"}))),
         1, "m.safetensors"),
    case("model-short-data", with_model(lambda ws: write(ws, "m.safetensors", safetensors_bytes(GOOD_SHAPE, bytes(8)))),
         1, "m.safetensors"),
    case("model-directory", with_model(lambda ws: special(ws, "m.safetensors", "dir")), 2, "m.safetensors"),
    case("model-fifo", with_model(lambda ws: special(ws, "m.safetensors", "fifo")), 2, "m.safetensors", sub_=True),
    case("model-dev-zero", with_model(lambda ws: special(ws, "m.safetensors", "zero")), 2, "m.safetensors",
         sub_=True),
    case("index-weight-map-list", with_model(index(["model.safetensors"])), 1, "index.json"),
    case("index-weight-map-ints", with_model(index({"up.weight": 5})), 1, "index.json"),
    case("index-weight-map-missing-shard", with_model(index({"up.weight": "nope.safetensors"})), 1, "nope"),
    case("index-weight-map-traversal", with_model(index({"up.weight": "../../../../../../dev/zero"})), 1,
         "index.json", sub_=True),
    case("index-not-json", with_model(lambda ws: write(ws, "m.index.json", GARBAGE)), 1, "m.index.json"),
    case("index-huge", with_model(lambda ws: special(ws, "m.index.json", "huge")), 1, "m.index.json", sub_=True),
    case("index-fifo", with_model(lambda ws: special(ws, "m.index.json", "fifo")), 2, "m.index.json", sub_=True),
    case("against-pickle", against(lambda ws: write(ws, "f.pkl", PICKLE)), 1, "f.pkl"),
    case("against-garbage-header",
         against(lambda ws: write(ws, "f.safetensors", safetensors_bytes({}, length=1 << 62))),
         1, "f.safetensors"),
    case("against-directory", against(lambda ws: special(ws, "f.safetensors", "dir")), 2, "f.safetensors"),
    case("against-fifo", against(lambda ws: special(ws, "f.safetensors", "fifo")), 2, "f.safetensors", sub_=True),
    case("key-fifo", key(lambda ws: special(ws, "k.pub", "fifo")), 2, "k.pub", sub_=True),
    case("key-dev-zero", key(lambda ws: special(ws, "k.pub", "zero")), 2, "k.pub", sub_=True),
    case("key-huge", key(lambda ws: special(ws, "k.pub", "huge")), 2, "k.pub", sub_=True),
    case("key-garbage", key(lambda ws: write(ws, "k.pub", GARBAGE)), 2, "k.pub"),
    case("key-directory", key(lambda ws: special(ws, "k.pub", "dir")), 2, "k.pub"),
    case("checkpoints-dir-is-file", lambda ws: {"--checkpoints": str(write(ws, "cps", b"x"))}, 2, "cps"),
    case("recipe-import-error", recipe("import no_such_module_xyz\n"), 2, "recipe.py"),
    case("recipe-raises-on-import", recipe("raise RuntimeError('boom')\n"), 2, "boom"),
    case("recipe-syntax-error", recipe("def (:\n"), 2, "recipe.py"),
    case("recipe-not-a-recipe", recipe("recipe = 5\n"), 2, "recipe"),
    case("recipe-exits-on-import", recipe("import sys\nsys.exit(7)\n"), 2, "recipe.py"),
    case("recipe-fifo", lambda ws: {"--recipe": f"{special(ws, 'recipe.py', 'fifo')}:recipe"}, 2, "recipe.py",
         sub_=True),
    case("recipe-raises-in-build", recipe(
        "class R:\n"
        "    def build_model(self, seed):\n        raise RuntimeError('no model today')\n"
        "    def build_optimizer(self, model):\n        raise RuntimeError('no')\n"
        "    def batch(self, step):\n        raise RuntimeError('no')\n"
        "    def train_step(self, model, optimizer, batch):\n        raise RuntimeError('no')\n"
        "recipe = R()\n"), 0, "no model today"),
    case("recipe-exits-in-build", recipe(
        "import sys\nclass R:\n"
        "    def build_model(self, seed):\n        sys.exit(9)\n"
        "    def build_optimizer(self, model):\n        sys.exit(9)\n"
        "    def batch(self, step):\n        sys.exit(9)\n"
        "    def train_step(self, model, optimizer, batch):\n        sys.exit(9)\n"
        "recipe = R()\n"), 0, "SystemExit"),
    case("compare-pickle", compare(lambda ws: write(ws, "f.pkl", PICKLE)), 2, "f.pkl"),
    case("compare-directory", compare(lambda ws: special(ws, "f.safetensors", "dir")), 2, "f.safetensors"),
    case("compare-fifo", compare(lambda ws: special(ws, "f.safetensors", "fifo")), 2, "f.safetensors", sub_=True),
]

GROUPS = {"records": RECORDS, "crafted": CRAFTED, "parts": PARTS, "checkpoints": CHECKPOINTS, "inputs": INPUTS}


def run_case(root: Path, c: Case) -> str | None:
    """Run one case; None when it behaved, else what went wrong."""
    ws = root / c.name
    shutil.copytree(STORED, ws, symlinks=True)
    made = c.make(ws)
    options = {"--key": str(ws / "trainer.pub"), "--model": str(ws / "model.safetensors")}
    if isinstance(made, list):
        args = made + ["--json"]
    else:
        if isinstance(made, dict):
            options.update(made)
        args = ["verify", str(ws / "ledger"), *[x for kv in options.items() for x in kv], "--json"]
    before = snapshot(ws)
    result = (run_subprocess if c.subprocess else run_inproc)(args)
    text = result.out + result.err
    problems = []
    if result.code != c.code:
        problems.append(f"exit {result.code}, expected {c.code}")
    if "Traceback" in text or "internal error" in text:
        problems.append("traceback/internal error")
    if result.code == 1 and args[0] == "verify":
        try:
            report = json.loads(result.out)
            if set(report["checks"]) != set(CHECK_NAMES):
                problems.append("not every check in the report")
        except (ValueError, KeyError, TypeError):
            problems.append("no JSON report")
    if result.code == 2 and len(result.err.strip().splitlines()) != 1:
        problems.append("not one line on stderr")
    if c.names and c.names not in text:
        problems.append(f"{c.names!r} not named")
    if snapshot(ws) != before:
        problems.append("files changed")
    if problems:
        last = (result.err.strip().splitlines() or [""])[-1][:200]
        return f"{c.name}: {', '.join(problems)} [{last}]"
    return None


def test_corpus_is_large_enough() -> None:
    assert sum(len(cases) for cases in GROUPS.values()) >= 60


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_hostile_inputs_end_in_a_report_or_one_line(group: str, tmp_path: Path) -> None:
    cases = GROUPS[group]
    bad = [problem for c in cases if (problem := run_case(tmp_path, c)) is not None]
    print(f"{group}: {len(cases) - len(bad)} of {len(cases)} cases behaved")
    assert not bad, f"{len(bad)} of {len(cases)} cases misbehaved:\n" + "\n".join(bad)


@pytest.mark.parametrize("group", ["records", "crafted", "parts"])
def test_info_and_log_on_hostile_ledgers_end_in_output_or_one_line(group: str, tmp_path: Path) -> None:
    """`ledger info` and `ledger log` read the same hostile ledgers: output, or one line and exit 1/2."""
    bad = []
    for c in GROUPS[group]:
        if c.subprocess:
            continue
        ws = tmp_path / c.name
        shutil.copytree(STORED, ws, symlinks=True)
        if isinstance(c.make(ws), (list, dict)):
            continue  # a case about the command line, not the ledger
        before = snapshot(ws)
        for args in (["info", str(ws / "ledger"), "--json"], ["log", str(ws / "ledger"), "--format", "csv"]):
            result = run_inproc(args)
            text = result.out + result.err
            if result.code not in (0, 1, 2) or "Traceback" in text or "internal error" in text or (
                    result.code and len(result.err.strip().splitlines()) != 1):
                bad.append(f"{c.name} {args[0]}: exit {result.code} {result.err.strip()[-200:]}")
        if snapshot(ws) != before:
            bad.append(f"{c.name}: files changed")
    assert not bad, "\n".join(bad)


def test_a_checkpoint_file_symlinked_out_is_refused_unread(tmp_path: Path) -> None:
    """A checkpoint file that is a symlink to a file elsewhere on the verifier's machine fails the
    checkpoint without being read: nothing of that file (here its tensor names) reaches the report."""
    from safetensors.numpy import save_file

    secret = tmp_path / "private" / "other.safetensors"
    secret.parent.mkdir()
    save_file({"patient_ssn_123": np.zeros(2, np.float32)}, str(secret))
    ws = tmp_path / "ws"
    shutil.copytree(STORED, ws, symlinks=True)
    target = checkpoint_dir(ws) / "model.safetensors"
    target.unlink()
    target.symlink_to(secret)
    result = run_inproc(["verify", str(ws / "ledger"), "--key", str(ws / "trainer.pub"), "--json"])
    report = json.loads(result.out)
    assert result.code == 1 and report["checks"]["checkpoints"]["status"] == "fail"
    assert "is a symlink" in report["checks"]["checkpoints"]["detail"]
    assert "patient" not in result.out + result.err


def test_verify_writes_no_bytecode_beside_the_recipe(tmp_path: Path) -> None:
    """Importing the recipe leaves no __pycache__ (even where Python would write one)."""
    source = "class R:\n    def build_model(self, seed):\n        raise RuntimeError('x')\n" \
             "    def build_optimizer(self, m): pass\n    def batch(self, s): pass\n" \
             "    def train_step(self, m, o, b): pass\nrecipe = R()\n"
    (tmp_path / "recipe.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-m", "ledger", "verify", str(STORED / "ledger"), "--recipe",
                           f"{tmp_path / 'recipe.py'}:recipe"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.py"]
