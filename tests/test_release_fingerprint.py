"""Release fingerprinting: the chunked, parallel reader behind ``safetensors_digests`` (verify
``--model``, the recorder's close) gives byte for byte the digests of the reference definition
(docs/FORMAT.md §10, one SHA-256 over each tensor's whole bytes) on tensors larger than a chunk and
on sharded indexes; hostile files still fail with one line; memory stays bounded; verify's
background hashing is used, and stopped when it is not."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ledger import LedgerWriter, Signer
from ledger._crypto import public_key_pem
from ledger._filehash import CHUNK, Cancelled, OpenFile, Span, hash_spans
from ledger._fingerprint import model_digest, read_shards, safetensors_digests, tensor_digest
from ledger.errors import FormatError

SIGNER = Signer.from_seed(bytes(range(32)))


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of little-endian numpy arrays (no torch needed)."""
    dtypes = {"<f4": "F32", "<f2": "F16", "<i8": "I64", "|u1": "U8"}
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtypes[array.dtype.str], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def reference(path: Path) -> dict[str, bytes]:
    """The definition, computed without the parallel reader: each tensor's bytes sliced from the
    whole file read into memory, one SHA-256 over all of them."""
    digests = {}
    for shard in read_shards(path):
        data = shard.file.read_bytes()
        for name, e in shard.entries.items():
            digests[name] = tensor_digest(name, e.dtype, e.shape, data[shard.start + e.begin:shard.start + e.end])
    return digests


def mixed(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two tensors larger than a chunk (one not a multiple of it), many small ones, an empty one."""
    tensors = {"big.weight": rng.standard_normal(CHUNK // 4 + 12345).astype("<f4"),
               "big2": rng.integers(0, 255, CHUNK * 2 + 7, dtype=np.uint8), "empty": np.zeros((0, 3), "<f4")}
    tensors.update({f"layer.{i}.bias": rng.standard_normal(i + 1).astype("<f2") for i in range(300)})
    tensors["ids"] = np.arange(-5, 5, dtype="<i8").reshape(2, 5)
    return tensors


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_parallel_digests_equal_the_reference(tmp_path, workers):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, mixed(np.random.default_rng(0)))
    expected = reference(path)
    assert safetensors_digests(path, workers=workers) == expected
    assert model_digest(safetensors_digests(path)) == model_digest(expected)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_any_chunk_size_gives_the_same_digests(tmp_path, chunk):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {f"t{i}": np.arange(i * 37, dtype="<f4") for i in range(40)})
    expected = reference(path)
    shard = next(read_shards(path))
    spans = [Span(n, b"p" + n.encode(), shard.start + e.begin, shard.start + e.end) for n, e in shard.entries.items()]
    with open(path, "rb") as handle:
        got = hash_spans([OpenFile(handle.fileno(), path, spans)], workers=3, chunk=chunk)
    data = path.read_bytes()
    import hashlib

    assert got == {s.key: hashlib.sha256(s.prefix + data[s.begin:s.end]).digest() for s in spans}
    assert len(expected) == 40


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_blocked_spans_hash_each_block_whatever_the_chunk(tmp_path, chunk):
    path = tmp_path / "raw"
    data = np.random.default_rng(2).integers(0, 255, 20000, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    spans = [Span(f"s{i}", b"b" * i, lo, hi, block) for i, (lo, hi, block) in
             enumerate([(0, 5000, 96), (5000, 5001, 4), (5001, 5100, 32), (5100, 20000, 1000), (300, 300, 8)])]
    with open(path, "rb") as handle:
        got = hash_spans([OpenFile(handle.fileno(), path, spans)], workers=3, chunk=chunk)
    import hashlib

    assert got == {s.key: b"".join(hashlib.sha256(s.prefix + data[lo:min(lo + s.block, s.end)]).digest()
                                   for lo in range(s.begin, s.end, s.block)) for s in spans}


def test_sharded_index_equals_the_reference(tmp_path):
    rng = np.random.default_rng(1)
    tensors = mixed(rng)
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):  # three shards, each with some of the tensors
        part = {n: tensors[n] for n in names[i::3]}
        write_safetensors(tmp_path / f"m-{i}.safetensors", part)
        weight_map.update({n: f"m-{i}.safetensors" for n in part})
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    expected = reference(index)
    assert len(expected) == len(tensors)
    assert safetensors_digests(index) == expected
    assert safetensors_digests(index, workers=1) == expected


def test_a_file_cut_while_it_is_hashed_fails(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"w": np.ones(1000, "<f4")})
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        os.truncate(path, size - 10)  # after the header was checked against the size
        with pytest.raises(FormatError, match="truncated") as info:
            hash_spans([OpenFile(handle.fileno(), path, [Span("w", b"", size - 4000, size)])], workers=2, chunk=64)
    assert "\n" not in str(info.value)


def test_cancel_stops_the_hashing(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, mixed(np.random.default_rng(2)))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        safetensors_digests(path, cancel=cancel)


# ----------------------------------------------------------------------------- hostile files, one line
def lying(tmp_path: Path) -> dict[str, Path]:
    """Files whose header lies: offsets past the end, a size that does not match the shape,
    overlapping tensors, and data cut short."""
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"a": np.ones(64, "<f4"), "b": np.ones(64, "<f4")})
    raw = good.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]

    def variant(name: str, edit: dict, body: bytes = data) -> Path:
        h = json.loads(json.dumps(header))
        for tensor, offsets in edit.items():
            h[tensor]["data_offsets"] = offsets
        encoded = json.dumps(h).encode()
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)
        return path

    return {"offsets past the end": variant("past", {"b": [256, 256 + 1 << 30]}),
            "wrong size": variant("size", {"a": [0, 200]}),
            "overlap": variant("overlap", {"b": [128, 384]}),
            "truncated data": variant("cut", {}, data[:-100])}


def test_lying_headers_fail_with_a_format_error(tmp_path):
    for what, path in lying(tmp_path).items():
        with pytest.raises(FormatError) as info:
            safetensors_digests(path)
        assert "\n" not in str(info.value), what


def sealed_ledger(path: Path, model: Path) -> Path:
    digests = safetensors_digests(model)
    writer = LedgerWriter.create(path, SIGNER, genesis={"config": {}})
    writer.seal({"final": {"tensor_digests": digests, "model_digest": model_digest(digests), "file": model.name},
                 "steps": 0}, step=0)
    key = path.parent / "key.pub"
    key.write_bytes(public_key_pem(SIGNER.public.raw))
    return key


def cli(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ledger", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_verify_model_passes_and_fails_with_one_line(tmp_path):
    model = tmp_path / "model.safetensors"
    write_safetensors(model, mixed(np.random.default_rng(3)))
    key = sealed_ledger(tmp_path / "L", model)
    ok = cli("verify", tmp_path / "L", "--key", key, "--model", model)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "model        pass" in ok.stdout
    for what, path in lying(tmp_path).items():
        bad = cli("verify", tmp_path / "L", "--key", key, "--model", path)
        assert bad.returncode == 1, (what, bad.stdout, bad.stderr)
        lines = [line for line in bad.stdout.splitlines() if line.strip().startswith("model ")]
        assert len(lines) == 1 and " fail " in lines[0], (what, bad.stdout)
    os.mkfifo(tmp_path / "fifo.safetensors")
    fifo = cli("verify", tmp_path / "L", "--key", key, "--model", tmp_path / "fifo.safetensors")
    assert fifo.returncode == 2 and len(fifo.stderr.strip().splitlines()) == 1 and "FIFO" in fifo.stderr


def test_verify_uses_the_background_digests_and_stops_them(tmp_path, monkeypatch):
    from ledger.verify import _inputs, verify_ledger

    model = tmp_path / "model.safetensors"
    write_safetensors(model, mixed(np.random.default_rng(4)))
    key = sealed_ledger(tmp_path / "L", model)
    started = []
    real = _inputs.safetensors_digests

    def counting(path, **kwargs):
        started.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(_inputs, "safetensors_digests", counting)
    report = verify_ledger(tmp_path / "L", key=key, model=model)
    assert {r.name: r.status.value for r in report.checks}["model"] == "pass"
    assert started == [model]
    assert not [t for t in threading.enumerate() if t.name.startswith(("ledger-model-digests", "ledger-hash"))]
    writer = LedgerWriter.create(tmp_path / "bare", SIGNER, genesis={"config": {}})  # no final weights: skip
    writer.seal()
    report = verify_ledger(tmp_path / "bare", key=key, model=model)
    assert {r.name: r.status.value for r in report.checks}["model"] == "skip"
    assert not [t for t in threading.enumerate() if t.name.startswith(("ledger-model-digests", "ledger-hash"))]


PEAK = r"""
import resource, sys
from ledger._blocked import safetensors_blocked_digests
from ledger._fingerprint import safetensors_digests
read = {"digests": safetensors_digests, "blocked": safetensors_blocked_digests}[sys.argv[2]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
read(sys.argv[1])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("reader", ["digests", "blocked"])
def test_memory_does_not_grow_with_the_file(tmp_path, reader):
    path = tmp_path / "big.safetensors"
    block = np.random.default_rng(5).integers(0, 255, 16 << 20, dtype=np.uint8)
    write_safetensors(path, {f"w{i}": block for i in range(12)})  # 192 MiB
    grown = int(subprocess.run([sys.executable, "-c", PEAK, str(path), reader], capture_output=True, text=True,
                               check=True, timeout=300).stdout)
    assert grown < 64 << 20, f"peak RSS grew by {grown >> 20} MiB hashing a 192 MiB file ({reader})"


def test_threaded_torch_digests_equal_the_sequential_ones():
    torch = pytest.importorskip("torch")
    from ledger.torch import torch_digests

    tensors = {"big": torch.randn(CHUNK // 2), "t": torch.randn(4, 6).t(), "bf": torch.randn(9).to(torch.bfloat16),
               "empty": torch.zeros(0, 2), "flag": torch.tensor([True, False]),
               **{f"s{i}": torch.arange(i, dtype=torch.int64) for i in range(1, 50)}}
    expected = torch_digests(tensors)
    got = torch_digests(tensors, workers=4)
    assert got == expected and list(got) == list(tensors)
