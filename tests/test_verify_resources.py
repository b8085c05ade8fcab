"""verify stays bounded on hostile ledgers (issue #10): bombs that are small on disk — many identical
rows in a tiny part, a record that decompresses to hundreds of MiB, CBOR lengths of 2**62, nesting
100 000 deep, safetensors headers near and over the limit — are verified by the real CLI in a child
process under a 1 GiB address-space limit and a 10 s timeout. Each one's peak RSS is measured
(``wait4``) and compared with verifying the clean stored run (the same ledger before it was
damaged): it must stay under 1 GiB, and the figures are printed (target: at most 2× clean).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ledger._record import HEADER_SIZE

STORED = Path(__file__).parent / "data" / "stored-run"
PART = Path("ledger/parts/000000.parquet")
LIMIT_AS = 1 << 30  # the address-space limit of the child
TIMEOUT = 10.0
RATIO_TARGET = 2.0

pytestmark = pytest.mark.slow

# The child sets the limit and forks the verifier from a small interpreter, so the grandchild's
# ru_maxrss (from wait4) is its own peak, not the high-water mark of the pytest process it came from.
CHILD = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
pid = os.fork()
if pid == 0:
    from ledger._cli import main
    try:
        main(sys.argv[2:])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: Arrow's thread pools may abort in it under the limit
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_limited(args: list[str], out_dir: Path) -> tuple[int | str, float, int, str]:
    """Run ``ledger ARGS`` in a grandchild limited to LIMIT_AS bytes of address space: (exit code or
    "timeout", seconds, peak RSS in bytes, stderr)."""
    out, err, rss = out_dir / "stdout", out_dir / "stderr", out_dir / "rss"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    with out.open("wb") as o, err.open("wb") as e:
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(limit=LIMIT_AS), str(rss), *args], stdout=o,
                                 stderr=e, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            code: int | str = child.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            code = "timeout"
    seconds = time.monotonic() - start
    return code, seconds, int(rss.read_text()) if rss.exists() else 0, err.read_text()


# ----------------------------------------------------------------------------- the bombs
def _table(ws: Path) -> pa.Table:
    return pq.read_table(ws / PART)


def _set_record(ws: Path, row: int, record: bytes) -> None:
    table = _table(ws)
    records = table["record"].to_pylist()
    records[row] = record
    index = table.schema.get_field_index("record")
    table = table.set_column(index, table.schema.field(index), pa.array(records, pa.binary()))
    pq.write_table(table, ws / PART, compression="zstd")


def _body(ws: Path, body: bytes, row: int = 5) -> None:
    record = _table(ws)["record"][row].as_py()
    _set_record(ws, row, record[:HEADER_SIZE] + body)


def many_identical_rows(ws: Path) -> None:
    """200 000 copies of one 2.6 KB step row: ~520 MB if decoded, a few KB on disk."""
    table = _table(ws)
    pq.write_table(pa.concat_tables([table.slice(5, 1)] * 200_000), ws / PART, compression="zstd",
                   use_dictionary=True)


def zeros_record(ws: Path) -> None:
    """A record body of 120 MiB of zeros (a CBOR byte string): a few hundred KB compressed."""
    size = 120 << 20
    _body(ws, b"\xa1\x61x\x5a" + struct.pack(">I", size) + bytes(size))


def huge_cbor_string(ws: Path) -> None:
    _body(ws, b"\xa1\x61x\x5b" + (1 << 62).to_bytes(8, "big"))


def huge_cbor_map(ws: Path) -> None:
    _body(ws, b"\xbb" + (1 << 62).to_bytes(8, "big"))


def huge_cbor_array(ws: Path) -> None:
    _body(ws, b"\xa1\x61x\x9a" + (1 << 31).to_bytes(4, "big") + b"\x00" * 1000)


def deep_nesting(ws: Path) -> None:
    _body(ws, b"\xa1\x61x" + b"\x81" * 100_000 + b"\x00")


def _safetensors(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _many_tensor_header(target: int) -> bytes:
    """A valid safetensors file whose JSON header is about ``target`` bytes: many one-float tensors."""
    header, n = {}, 0
    per = len(json.dumps({"t0000000": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}))
    count = target // per
    for n in range(count):
        header[f"t{n:07d}"] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * n, 4 * n + 4]}
    return _safetensors(header, bytes(4 * count))


def model_header_declared_huge(ws: Path) -> None:
    (ws / "model.safetensors").write_bytes(_safetensors({}, length=1 << 40))


def model_header_15_mib(ws: Path) -> None:
    (ws / "model.safetensors").write_bytes(_many_tensor_header(15 << 20))


def checkpoint_header_15_mib(ws: Path) -> None:
    directory = next(d for d in (ws / "ledger" / "checkpoints").iterdir())
    (directory / "model.safetensors").write_bytes(_many_tensor_header(15 << 20))


def sparse_wal(ws: Path) -> None:
    """A 3 GiB wal.log with nothing on disk (a sparse file)."""
    with (ws / "ledger" / "wal.log").open("r+b") as f:
        f.truncate(3 << 30)


def many_parts_of_big_records(ws: Path) -> None:
    """12 one-row parts each holding a 20 MiB zero record (a few KB each on disk): each part fits its
    own budget, the ledger's budget (64 MiB once + 32 × all parts' bytes) admits about three."""
    row = _table(ws).slice(5, 1)
    index = row.schema.get_field_index("record")
    row = row.set_column(index, row.schema.field(index), pa.array([bytes(20 << 20)], pa.binary()))
    for i in range(1, 13):
        pq.write_table(row, ws / "ledger" / "parts" / f"{i:06d}.parquet", compression="zstd", use_dictionary=False)


def many_parts(ws: Path) -> None:
    """4100 one-row parts (a copy of the genesis row each): more than the 4096 a reader reads."""
    one = ws / "one.parquet"
    pq.write_table(_table(ws).slice(0, 1), one, compression="zstd")
    for i in range(1, 4101):
        shutil.copyfile(one, ws / "ledger" / "parts" / f"{i:06d}.parquet")


def _frame(payload: bytes) -> bytes:
    import zlib

    return struct.pack(">II", len(payload), zlib.crc32(payload)) + payload


def wal_many_frames(ws: Path) -> None:
    """A 14 MB wal.log of 70 000 minimal linked frames: more than the 65 536 a reader reads."""
    from ledger._reader import Ledger
    from ledger._record import Header, Kind, encode_record, entry_hash

    genesis = next(Ledger(ws / "ledger").entries())
    (ws / PART).unlink()
    frames, prev = [b"TLWAL1\n\0", _frame(genesis.key_id + genesis.signature + genesis.record)], genesis.hash
    header = genesis.header
    for seq in range(1, 70_000):
        record = encode_record(Header(1, Kind.STEP, seq, seq - 1, header.time_ns, header.run_digest, prev), b"\xa0")
        frames.append(_frame(genesis.key_id + bytes(64) + record))
        prev = entry_hash(record)
    (ws / "ledger" / "wal.log").write_bytes(b"".join(frames))


BOMBS: dict[str, Callable[[Path], None]] = {
    "wal-sparse-3GiB": sparse_wal,
    "many-identical-rows": many_identical_rows,
    "zeros-record-120MiB": zeros_record,
    "cbor-string-2**62": huge_cbor_string,
    "cbor-map-2**62": huge_cbor_map,
    "cbor-array-2**31": huge_cbor_array,
    "cbor-nesting-100000": deep_nesting,
    "safetensors-header-declared-1TiB": model_header_declared_huge,
    "safetensors-header-15MiB": model_header_15_mib,
    "checkpoint-header-15MiB": checkpoint_header_15_mib,
    "parts-12x20MiB-records": many_parts_of_big_records,
    "parts-4100": many_parts,
    "wal-70000-frames": wal_many_frames,
}
#: bombs allowed more than RATIO_TARGET × clean, and how many bytes more (name → (bytes, why)):
#: the 64 MiB floor of the ledger's budget admits up to 64 MiB of records once, and verification holds
#: them as the table, the list of records and a decoded body, and signs over a copy
OVER_RATIO: dict[str, tuple[int, str]] = {
    "parts-12x20MiB-records": (4 * 64 << 20, "the ledger's 64 MiB floor, held a few times over"),
}
#: bombs still over the limits until the format readers' hardening covers them (name → root cause)
PENDING: dict[str, str] = {}


def _args(ws: Path) -> list[str]:
    return ["verify", str(ws / "ledger"), "--key", str(ws / "trainer.pub"), "--model", str(ws / "model.safetensors"),
            "--json"]


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, int]:
    """Peak RSS and bytes on disk of verifying the clean stored run under the same limits."""
    ws = tmp_path_factory.mktemp("clean") / "run"
    shutil.copytree(STORED, ws)
    code, seconds, rss, err = run_limited(_args(ws), ws.parent)
    assert code == 0, err
    return rss, _disk_bytes(ws)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=PENDING[n]))
                                  if n in PENDING else n for n in BOMBS])
def test_hostile_ledger_is_verified_within_bounds(name: str, clean: tuple[int, int], tmp_path: Path) -> None:
    ws = tmp_path / "run"
    shutil.copytree(STORED, ws)
    BOMBS[name](ws)
    code, seconds, rss, err = run_limited(_args(ws), tmp_path)
    clean_rss, clean_disk = clean
    print(f"{name}: exit {code}, {seconds:.2f} s, peak RSS {rss / 2**20:.0f} MiB = {rss / clean_rss:.2f}x clean "
          f"({clean_rss / 2**20:.0f} MiB); on disk {_disk_bytes(ws) / 2**10:.0f} KiB vs {clean_disk / 2**10:.0f} KiB")
    assert code != "timeout", f"{name} ran past {TIMEOUT} s"
    assert code in (1, 2), f"{name}: exit {code}: {err[-2000:]}"
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert rss <= LIMIT_AS
    allowed = RATIO_TARGET * clean_rss + OVER_RATIO.get(name, (0, ""))[0]
    assert rss <= allowed, f"{name}: peak RSS {rss / clean_rss:.2f}x the clean run's"
