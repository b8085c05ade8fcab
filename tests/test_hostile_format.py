"""Hostile bytes at the format level: every crafted record, body, typed body, part, safetensors
file, index or checkpoint file is a FormatError naming what is wrong — never another exception —
and the resource bombs are refused in bounded time and memory (each read in a child process under
a 1 GiB address-space limit and a 10 s timeout, its peak RSS compared with a clean part's)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FIXED_SEED, write_ledger

from ledger import FormatError, Signer
from ledger._encoding import MAX_ITEMS, decode_body, encode_body
from ledger._fingerprint import read_shards, safetensors_digests
from ledger._parts import SCHEMA, read_part
from ledger._record import HEADER_SIZE, MAX_RECORD_BYTES, Header, Kind, decode_header, encode_header
from ledger._schema import CheckpointBody, FingerprintPolicy, Genesis, PruneBody, ResumeBody, SealBody, StepBody
from ledger._state import digests_of, read_meta
from ledger._weights import read_safetensors

D32 = b"\x11" * 32


def _header(**fields) -> bytes:
    values = dict(version=1, kind=Kind.STEP, seq=1, step=0, time_ns=0, run_digest=D32, prev_hash=D32)
    values.update(fields)
    return encode_header(Header(**values))


GOOD_RECORD = _header() + encode_body({"metrics": {"loss": 1.0}})

# ----------------------------------------------------------------------------- records
RECORDS = {
    "version 2": b"\x00\x02" + GOOD_RECORD[2:],
    "cut to 50 bytes": GOOD_RECORD[:50],
    "empty": b"",
    "reserved byte set": GOOD_RECORD[:3] + b"\x01" + GOOD_RECORD[4:],
    "kind 9": GOOD_RECORD[:2] + b"\x09" + GOOD_RECORD[3:],
    "kind 255": GOOD_RECORD[:2] + b"\xff" + GOOD_RECORD[3:],
    "not bytes": "a record as text",
}


@pytest.mark.parametrize("name", RECORDS)
def test_hostile_record_header(name):
    with pytest.raises(FormatError):
        decode_header(RECORDS[name])  # type: ignore[arg-type]


def test_record_over_64_mib_is_refused():
    record = bytearray(MAX_RECORD_BYTES + 1)
    record[:HEADER_SIZE] = GOOD_RECORD[:HEADER_SIZE]
    with pytest.raises(FormatError, match="64 MiB"):
        decode_header(bytes(record))


# ----------------------------------------------------------------------------- CBOR bodies
def _big(head: int, n: int) -> bytes:
    return bytes([head | 27]) + n.to_bytes(8, "big")


BODIES = {
    "deep nesting": b"\xa1\x61a" + b"\x81" * 100_000 + b"\x00",
    "deep maps": b"\xa1\x61a" * 100_000 + b"\x00",
    "array of 2^60": b"\xa1\x61a" + _big(0x80, 1 << 60),
    "map of 2^60": b"\xa1\x61a" + _big(0xA0, 1 << 60),
    "bytes of 2^62": b"\xa1\x61a" + _big(0x40, 1 << 62) + b"xx",
    "text of 2^31": b"\xa1\x61a\x7a\x80\x00\x00\x00xx",
    "indefinite array": bytes.fromhex("a161619f00ff"),
    "indefinite map": bytes.fromhex("bf616100ff"),
    "not a map": bytes.fromhex("8100"),
    "empty": b"",
    "trailing bytes": bytes.fromhex("a1616100ff"),
    "duplicate keys": bytes.fromhex("a2616100616100"),
    "integer key": bytes.fromhex("a10000"),
    "bad UTF-8 key": bytes.fromhex("a162ff0000"),
    "undefined": bytes.fromhex("a16161f7"),
    "simple value": bytes.fromhex("a16161f0"),
    "datetime tag": bytes.fromhex("a16161c11a00000000"),
    "unknown tag": bytes.fromhex("a16161d9ffff00"),
    "typed array, odd length": bytes.fromhex("a16161d85543000000"),
    "typed array over text": bytes.fromhex("a16161d8556141"),
    "non-shortest int": bytes.fromhex("a161611800"),
    "NaN payload": bytes.fromhex("a16161fb7ff8000000000001"),
    "2^21+ items": b"\xa1\x61a" + b"\x9a" + (MAX_ITEMS + 1).to_bytes(4, "big") + b"\x80" * (MAX_ITEMS + 1),
}


@pytest.mark.parametrize("name", BODIES)
def test_hostile_body(name):
    with pytest.raises(FormatError):
        decode_body(BODIES[name])


def test_body_of_wrong_python_type():
    with pytest.raises(FormatError):
        decode_body({"a": 1})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- typed bodies
def _genesis() -> Genesis:
    return Genesis.from_body({
        "run_id": "r", "format": 1, "seed": 0,
        "fingerprints": {"tensor_order": ["w", "b"], "sketch_k": 8, "sketch_seed": 1},
        "optimizer": {"class": "SGD", "param_groups": [{"lr": 0.1}]},
        "init": {"tensor_digests": {"w": D32, "b": D32}, "model_digest": D32,
                 "sketch": np.zeros(8), "norms": np.zeros(2)},
    })


CHECKPOINT = {"tensor_digests": {"w": D32}, "model_digest": D32, "optimizer_digest": D32, "meta_digest": D32,
              "state_digest": D32, "path": "checkpoints/x"}
TYPED = {
    "superseded count 10^11": (ResumeBody.from_body, {"checkpoint_seq": 1, "checkpoint_step": 0, "state_digest": D32,
                               "superseded": {"first_seq": 2, "last_seq": 3, "count": 10**11}}, "count"),
    "superseded past its entry": (lambda b: ResumeBody.from_body(b, seq=5), {
        "checkpoint_seq": 1, "checkpoint_step": 0, "state_digest": D32,
        "superseded": {"first_seq": 2, "last_seq": 10**11}}, "last_seq"),
    "superseded steps not a pair": (ResumeBody.from_body, {"checkpoint_seq": 1, "checkpoint_step": 0,
                                    "state_digest": D32, "superseded": {"first_seq": 2, "last_seq": 3,
                                                                        "steps": [1, 2, 3]}}, "steps"),
    "resume seq a string": (ResumeBody.from_body, {"checkpoint_seq": "1", "checkpoint_step": 0,
                                                   "state_digest": D32}, "checkpoint_seq"),
    "norms of the wrong length": (lambda b: StepBody.from_body(b, _genesis()), {"norms": np.zeros(3)}, "norms"),
    "norms as text": (StepBody.from_body, {"norms": "1,2"}, "norms"),
    "metrics a list": (StepBody.from_body, {"norms": np.zeros(2), "metrics": [1]}, "metrics"),
    "tensor_digests not 32-byte multiple": (StepBody.from_body, {"norms": np.zeros(2), "tensor_digests": b"x" * 33},
                                            "tensor_digests"),
    "optimizer_steps huge": (StepBody.from_body, {"norms": np.zeros(2), "optimizer_steps": 2**70}, "optimizer_steps"),
    "checkpoint path an int": (CheckpointBody.from_body, {**CHECKPOINT, "path": 7}, "path"),
    "checkpoint path with NUL": (CheckpointBody.from_body, {**CHECKPOINT, "path": "a\x00b"}, "path"),
    "checkpoint digest short": (CheckpointBody.from_body, {**CHECKPOINT, "model_digest": b"x"}, "model_digest"),
    "checkpoint tensor_digests a list": (CheckpointBody.from_body, {**CHECKPOINT, "tensor_digests": [D32]},
                                         "tensor_digests"),
    "prune reason an int": (PruneBody.from_body, {"checkpoint_seq": 1, "state_digest": D32, "reason": 3}, "reason"),
    "seal entry_count text": (SealBody.from_body, {"entry_count": "3", "head": D32, "tree_root": D32}, "entry_count"),
    "seal final digests a list": (SealBody.from_body, {"entry_count": 3, "head": D32, "tree_root": D32,
                                                       "final": {"tensor_digests": [], "model_digest": D32}},
                                  "tensor_digests"),
    "sketch_k not a power of two": (FingerprintPolicy.from_body, {"tensor_order": [], "sketch_k": 3,
                                                                  "sketch_seed": 0}, "sketch_k"),
    "fingerprints digests a map": (FingerprintPolicy.from_body, {"tensor_order": [], "sketch_k": 4, "sketch_seed": 0,
                                                                 "digests": {"a": 1}}, "digests"),
    "genesis body a list": (Genesis.from_body, [1, 2], "map"),
    "step body a list": (StepBody.from_body, [1, 2], "map"),
}


@pytest.mark.parametrize("name", TYPED)
def test_hostile_typed_body(name):
    reader, body, field = TYPED[name]
    with pytest.raises(FormatError, match=field):
        reader(body)


# ----------------------------------------------------------------------------- safetensors
def _safetensors(header: object, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
SAFETENSORS = {
    "unknown dtype": _safetensors({"w": {**F32, "dtype": "Q7"}}, bytes(8)),
    "dtype an int": _safetensors({"w": {**F32, "dtype": 4}}, bytes(8)),
    "negative shape": _safetensors({"w": {**F32, "shape": [-2]}}, bytes(8)),
    "string offsets": _safetensors({"w": {**F32, "data_offsets": ["0", "8"]}}, bytes(8)),
    "three offsets": _safetensors({"w": {**F32, "data_offsets": [0, 4, 8]}}, bytes(8)),
    "overlapping offsets": _safetensors({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(12)),
    "hole between tensors": _safetensors({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, bytes(20)),
    "out-of-range offsets": _safetensors({"w": {**F32, "data_offsets": [0, 1 << 40]}}, bytes(8)),
    "wrong size for shape": _safetensors({"w": {**F32, "shape": [3]}}, bytes(8)),
    "256 dimensions": _safetensors({"w": {**F32, "shape": [1] * 256}}, bytes(8)),
    "entry a list": _safetensors({"w": [1, 2]}, bytes(8)),
    "header a list": _safetensors([1, 2]),
    "metadata not text": _safetensors({"__metadata__": {"a": 1}}),
    "lone surrogate name": _safetensors(None, bytes(8), raw=b'{"\\ud800":{"dtype":"F32","shape":[2],'
                                                            b'"data_offsets":[0,8]}}'),
    "100k-deep JSON": _safetensors(None, raw=b"[" * 100_000 + b"]" * 100_000),
    "container bomb": _safetensors(None, raw=b"[" + b"{}," * 200_000 + b"{}]"),
    "bad JSON": _safetensors(None, raw=b"{nope"),
    "header longer than file": struct.pack("<Q", 1000) + b"{}",
    "too short": b"\x01\x02",
    "a pickle": b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01w\x94K\x01s.",
}


@pytest.mark.parametrize("name", SAFETENSORS)
def test_hostile_safetensors(tmp_path, name):
    path = tmp_path / "model.safetensors"
    path.write_bytes(SAFETENSORS[name])
    with pytest.raises(FormatError):
        safetensors_digests(path)
    with pytest.raises(FormatError):
        read_safetensors(path)


def test_96_mib_header_is_refused_unread(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as handle:  # sparse: 96 MiB of header announced and present, nothing written
        handle.write(struct.pack("<Q", 96 << 20) + b"{")
        handle.truncate(8 + (96 << 20))
    with pytest.raises(FormatError, match="16 MiB"):
        list(read_shards(path))


def test_directory_fifo_and_device_instead_of_safetensors(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    for name in ("dir.safetensors", "fifo.safetensors", "zero.safetensors"):
        with pytest.raises(FormatError):
            safetensors_digests(tmp_path / name)


@pytest.mark.parametrize("index", [
    {"weight_map": ["a.safetensors"]}, {"weight_map": {"w": 3}}, [1], {"weight_map": {"w": "../x.safetensors"}},
    {"weight_map": {"w": "/dev/zero"}},
], ids=["weight_map a list", "file name an int", "index a list", "path outside", "absolute device"])
def test_hostile_index(tmp_path, index):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    with pytest.raises(FormatError):
        safetensors_digests(path)


# ----------------------------------------------------------------------------- checkpoint files
def test_hostile_state_cbor(tmp_path):
    directory = tmp_path / "cp"
    directory.mkdir()
    (directory / "state.cbor").write_bytes(b"\x9f\x00")
    with pytest.raises(FormatError):
        read_meta(directory)
    (directory / "state.cbor").unlink()
    os.mkfifo(directory / "state.cbor")
    with pytest.raises(FormatError, match="FIFO"):
        read_meta(directory)
    (directory / "state.cbor").unlink()
    with open(directory / "state.cbor", "wb") as handle:
        handle.truncate(65 << 20)
    with pytest.raises(FormatError):
        read_meta(directory)
    for name in ("model.safetensors", "optimizer.safetensors"):
        (directory / name).mkdir()
    with pytest.raises(FormatError):
        digests_of(directory)


# ----------------------------------------------------------------------------- parts
@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    return write_ledger(root / "ledger", Signer.from_seed(FIXED_SEED), 2000)


def _clean_table(clean: Path) -> pa.Table:
    return pq.read_table(sorted((clean / "parts").glob("*.parquet"))[0])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            return bytes(out)


def hostile_parts(clean: Path, out: Path) -> dict[str, Path]:
    """Crafted parts (each a few KB to ~100 KB) that made the old reader hang or balloon."""
    table = _clean_table(clean)
    paths: dict[str, Path] = {}

    def write(name: str, t: pa.Table, **kwargs) -> None:
        paths[name] = out / f"{name}.parquet"
        pq.write_table(t, paths[name], **{"compression": "zstd", **kwargs})

    one = table.slice(0, 1)
    write("million identical rows", pa.concat_tables([one] * 1000).combine_chunks().take(
        pa.array(np.zeros(1_000_000, dtype=np.int64))), use_dictionary=True, row_group_size=1 << 20)
    rows = 600
    big = table.slice(0, rows).set_column(SCHEMA.get_field_index("record"), SCHEMA.field("record"),
                                          pa.array([b"\x00" * (1 << 20)] * rows, pa.binary()))
    write("dictionary expansion", big, use_dictionary=["record"], dictionary_pagesize_limit=1 << 30)
    many = one.set_column(SCHEMA.get_field_index("metrics"), SCHEMA.field("metrics"),
                          pa.array([[("a", 1.0)] * 1_000_000], SCHEMA.field("metrics").type))
    write("metric entries", many, use_dictionary=True, data_page_size=1 << 30, write_statistics=False)
    # the same, its footer claiming 20 000 entries: Arrow trusts the page header, not the footer
    data = paths["metric entries"].read_bytes()
    footer_len = struct.unpack("<I", data[-8:-4])[0]
    footer = data[-8 - footer_len:-8].replace(_varint(2_000_000), _varint(40_000))
    paths["metric entries, lying footer"] = out / "lying.parquet"
    paths["metric entries, lying footer"].write_bytes(data[:-8 - footer_len] + footer + data[-8:])
    paths["not parquet"] = out / "garbage.parquet"
    paths["not parquet"].write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    clean_bytes = sorted((clean / "parts").glob("*.parquet"))[0].read_bytes()
    paths["truncated"] = out / "truncated.parquet"
    paths["truncated"].write_bytes(clean_bytes[:len(clean_bytes) // 2])
    paths["footer cut"] = out / "footercut.parquet"
    paths["footer cut"].write_bytes(clean_bytes[:-9] + clean_bytes[-8:])
    write("wrong schema", pa.table({"seq": pa.array([1, 2], pa.int64())}))
    paths["a FIFO"] = out / "fifo.parquet"
    os.mkfifo(paths["a FIFO"])
    paths["/dev/zero"] = out / "zero.parquet"
    paths["/dev/zero"].symlink_to("/dev/zero")
    paths["a directory"] = out / "dir.parquet"
    paths["a directory"].mkdir()
    return paths


PART_CASES = ["million identical rows", "dictionary expansion", "metric entries", "metric entries, lying footer",
              "not parquet", "truncated", "footer cut", "wrong schema", "a FIFO", "/dev/zero", "a directory"]


@pytest.fixture(scope="module")
def parts(clean, tmp_path_factory) -> dict[str, Path]:
    return hostile_parts(clean, tmp_path_factory.mktemp("hostile"))


_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from pathlib import Path
    from ledger._parts import read_part
    from ledger.errors import FormatError
    start = time.perf_counter()
    try:
        read_part(Path(sys.argv[1]))
        outcome = "read"
    except FormatError as exc:
        outcome = "FormatError: " + str(exc)[:200]
    except BaseException as exc:
        outcome = type(exc).__name__ + ": " + str(exc)[:200]
    # VmHWM, not ru_maxrss: ru_maxrss survives execve and would count the forking parent
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - start,
                      "rss_mib": int(hwm.split()[1]) / 1024}), flush=True)
    # skip interpreter teardown: Arrow's thread pools, torn down under the address-space limit on a
    # loaded machine, abort now and then ("terminate called without an active exception")
    import os
    os._exit(0)
""")


def read_in_child(path: Path) -> dict[str, object]:
    """read_part(path) in a child under a 1 GiB address-space limit and a 10 s timeout."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=10,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", PART_CASES)
def test_hostile_part_in_process(parts, name):
    with pytest.raises(FormatError):
        read_part(parts[name])


RESOURCE_CASES = ["million identical rows", "dictionary expansion", "metric entries", "metric entries, lying footer"]


def test_hostile_parts_bounded_rss(clean, parts):
    """Each bomb is refused in < 10 s and ≤ 2× the peak RSS of reading a clean part (and < 1 GiB)."""
    baseline = read_in_child(sorted((clean / "parts").glob("*.parquet"))[0])
    assert baseline["outcome"] == "read"
    figures = {"clean": baseline}
    for name in RESOURCE_CASES:
        figures[name] = result = read_in_child(parts[name])
        assert str(result["outcome"]).startswith("FormatError"), (name, result)
        assert float(result["seconds"]) < 10
        assert float(result["rss_mib"]) <= max(2 * float(baseline["rss_mib"]), 1), (name, result, baseline)
        assert float(result["rss_mib"]) < 1024
    print(json.dumps(figures, indent=1))


def test_wal_fifo_and_dev_zero_are_refused(clean, tmp_path):
    import shutil

    import ledger

    for target in ("fifo", "zero"):
        copy = tmp_path / target
        shutil.copytree(clean, copy)
        (copy / "wal.log").unlink()
        if target == "fifo":
            os.mkfifo(copy / "wal.log")
        else:
            (copy / "wal.log").symlink_to("/dev/zero")
        sources = ledger.open(copy).sources()
        assert sources[-1].name == "wal.log" and sources[-1].table is None
        assert "FIFO" in str(sources[-1].error) or "device" in str(sources[-1].error)


def test_parts_share_one_budget(clean, tmp_path):
    """Many small parts cannot each claim the 64 MiB floor: the ledger's budget (64 MiB once + 32 ×
    all parts' bytes) admits the first few 20 MiB records, in order, and refuses the rest."""
    import shutil

    import ledger

    copy = tmp_path / "ledger"
    shutil.copytree(clean, copy)
    row = _clean_table(clean).slice(1, 1)
    row = row.set_column(SCHEMA.get_field_index("record"), SCHEMA.field("record"),
                         pa.array([bytes(20 << 20)], pa.binary()))
    for i in range(1, 9):
        pq.write_table(row, copy / "parts" / f"{i:06d}.parquet", compression="zstd", use_dictionary=False)
    for _ in range(2):  # the same parts are refused however the two reading threads interleave
        sources = ledger.open(copy).sources()
        readable = [s.name for s in sources if s.table is not None]
        assert readable == [f"parts/{i:06d}.parquet" for i in range(4)]
        assert all("ledger's budget" in (s.error or "") for s in sources[4:])


def test_wal_frame_cap():
    """A log of more whole frames than any writer leaves is refused; one at the cap is read."""
    from ledger import _wal

    frame = _wal.encode_frame(ledger_entry := _minimal_entry())
    at_cap = _wal.MAGIC + frame * _wal.MAX_LOG_FRAMES
    found = _wal.frames(at_cap)
    assert len(found.payloads) == _wal.MAX_LOG_FRAMES and bytes(found.record(0)) == ledger_entry.record
    with pytest.raises(FormatError, match="frames"):
        _wal.frames(at_cap + frame)


def _minimal_entry():
    from ledger._entry import Entry

    record = encode_header(Header(1, Kind.STEP, 1, 0, 0, bytes(32), bytes(32))) + b"\xa0"
    return Entry(record=record, signature=bytes(64), key_id=bytes(32))
