"""Weights without torch: safetensors files read by ledger._weights, and its numpy count-sketch
against the torch one."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

import ledger._weights as weights_module
from ledger._fingerprint import sketch_hash
from ledger._weights import NumpySketch, TensorFile, file_fingerprints, read_safetensors, sketch_slots_numpy
from ledger.errors import ConfigurationError, FormatError
from ledger.torch import CountSketch, sketch_slots


def expected(tensor: torch.Tensor) -> np.ndarray:
    """What read_safetensors must return for a tensor saved with safetensors.torch."""
    return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, generator=g) * 100
    floats[0, :4] = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan")])
    ints = torch.randint(-(2**62), 2**62, (4, 3), generator=g, dtype=torch.int64)
    tensors = {
        "f64": floats.double(), "f32": floats, "f16": floats.half(), "bf16": floats.bfloat16(),
        "i64": ints, "i32": (ints >> 31).int(), "i16": (ints >> 48).short(), "i8": (ints >> 56).to(torch.int8),
        "u8": (ints & 0xFF).to(torch.uint8), "bool": ints > 0,
        "scalar": torch.tensor(2.5), "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 7), "empty_bool": torch.zeros(3, 0, dtype=torch.bool),
        "transposed": torch.randn(4, 6, generator=g).t().contiguous(),
        "é/unicode.weight": torch.arange(6, dtype=torch.int16).reshape(2, 3),
    }
    return tensors


def test_round_trip_every_dtype(tmp_path: Path) -> None:
    tensors = all_dtypes()
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    read = read_safetensors(tmp_path / "w.safetensors")
    assert set(read) == set(tensors)
    for name, tensor in tensors.items():
        assert same_bits(read[name], expected(tensor)), name
        assert read[name].dtype.isnative and read[name].flags.c_contiguous and read[name].flags.writeable
    read["f32"][0, 0] = 1.0  # owned memory, not a read-only view into a closed mapping
    assert read["bf16"].dtype == np.float32 and read["bool"].dtype == np.bool_


def test_unsigned_dtypes_written_by_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays: dict[str, np.ndarray] = {
        "u16": rng.integers(0, 2**16, (5,), dtype=np.uint16), "u32": rng.integers(0, 2**32, (2, 2), dtype=np.uint32),
        "u64": np.array([0, 2**64 - 1, 2**63], dtype=np.uint64), "big_endian": np.arange(4, dtype=">i4")}
    save_numpy(arrays, str(tmp_path / "u.safetensors"))
    read = read_safetensors(str(tmp_path / "u.safetensors"))
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype.newbyteorder("=") and read[name].dtype.isnative
        assert np.array_equal(read[name], array), name


def test_sharded_checkpoint(tmp_path: Path) -> None:
    first = {"a": torch.ones(2, 3), "c": torch.arange(4, dtype=torch.int32)}
    second = {"b": torch.full((5,), 0.25, dtype=torch.bfloat16)}
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors",
                  "b": "model-00002-of-00002.safetensors"}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    read = read_safetensors(index)
    assert set(read) == {"a", "b", "c"}
    for name, tensor in {**first, **second}.items():
        assert same_bits(read[name], expected(tensor)), name
    assert set(read_safetensors(index, names=["b"])) == {"b"}

    save_file({"a": torch.zeros(1)}, str(tmp_path / "model-00002-of-00002.safetensors"))  # "a" in both shards
    with pytest.raises(FormatError, match="'a' appears in more than one shard"):
        read_safetensors(index)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    # a shard the index names but that is absent is damaged evidence, not a usage error
    with pytest.raises(FormatError, match=r"00002.safetensors \(named by model.safetensors.index.json\) does not"):
        read_safetensors(index)
    (tmp_path / "bad.index.json").write_text("{}")
    with pytest.raises(FormatError, match="weight_map"):
        read_safetensors(tmp_path / "bad.index.json")


def test_names_reads_only_what_is_asked(tmp_path: Path) -> None:
    tensors = all_dtypes()
    save_file(tensors, str(tmp_path / "w.safetensors"))
    assert list(read_safetensors(tmp_path / "w.safetensors", names=[])) == []
    read = read_safetensors(tmp_path / "w.safetensors", names=iter(["bf16", "i8"]))
    assert set(read) == {"bf16", "i8"}
    assert same_bits(read["bf16"], expected(tensors["bf16"]))
    assert set(read_safetensors(tmp_path / "w.safetensors", names="f32")) == {"f32"}  # one name, not its letters
    with pytest.raises(ConfigurationError, match="no tensor named 'nope'"):
        read_safetensors(tmp_path / "w.safetensors", names=["f32", "nope"])


def test_names_do_not_materialise_other_tensors(tmp_path: Path) -> None:
    # a tensor whose dtype cannot be read without torch is fine as long as nobody asks for it
    save_file({"fp8": torch.ones(4).to(torch.float8_e4m3fn), "e5m2": torch.ones(2).to(torch.float8_e5m2),
               "w": torch.ones(3)}, str(tmp_path / "f8.safetensors"))
    assert same_bits(read_safetensors(tmp_path / "f8.safetensors", names=["w"])["w"], np.ones(3, np.float32))
    for name in ("fp8", "e5m2"):
        with pytest.raises(FormatError, match=f"'{name}' of dtype F8_E.* cannot be read without torch"):
            read_safetensors(tmp_path / "f8.safetensors", names=[name])
    with pytest.raises(FormatError, match="cannot be read without torch"):
        read_safetensors(tmp_path / "f8.safetensors")


def raw_file(header: object, data: bytes, header_length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if header_length is None else header_length) + encoded + data


@pytest.mark.parametrize("case, message", [
    ("truncated", "'w' lies outside the file or has the wrong size"),
    ("offsets_outside", "'w' lies outside the file or has the wrong size"),
    ("negative_offset", "'w' lies outside the file or has the wrong size"),
    ("wrong_size", "'w' lies outside the file or has the wrong size"),
    ("header_too_long", "header is longer than the file"),
    ("short", "too short"),
    ("bad_json", "not a safetensors file"),
    ("not_a_dict", "not a safetensors file"),
    ("malformed_entry", "'w' has a malformed header entry"),
    ("string_shape", "'w' has a malformed header entry"),
    ("unknown_dtype", "'w' has the unknown dtype 'X9'"),
])
def test_malformed_files(tmp_path: Path, case: str, message: str) -> None:
    good = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    data = np.array([1.0, 2.0], "<f4").tobytes()
    content = {
        "truncated": raw_file(good, data[:-3]),
        "offsets_outside": raw_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, data),
        "negative_offset": raw_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, data),
        "wrong_size": raw_file({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data),
        "header_too_long": raw_file(good, data, header_length=10_000),
        "short": b"\x01\x00",
        "bad_json": raw_file(good, data)[:8] + b"{" * len(json.dumps(good)) + data,
        "not_a_dict": raw_file([1, 2], data),
        "malformed_entry": raw_file({"w": {"dtype": "F32", "shape": [2]}}, data),
        "string_shape": raw_file({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, data),
        "unknown_dtype": raw_file({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, data),
    }[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message) as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


def test_malformed_tensor_not_requested_still_fails(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    (tmp_path / "w.safetensors").write_bytes(raw_file(header, bytes(8)))
    with pytest.raises(FormatError, match="'v' lies outside the file"):
        read_safetensors(tmp_path / "w.safetensors", names=["w"])


def test_good_hand_written_file_and_missing_file(tmp_path: Path) -> None:
    header = {"__metadata__": {"a": "b"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    (tmp_path / "w.safetensors").write_bytes(raw_file(header, np.array([1.0, -2.0], "<f4").tobytes()))
    assert read_safetensors(tmp_path / "w.safetensors")["w"].tolist() == [1.0, -2.0]
    with pytest.raises(ConfigurationError, match="does not exist"):
        read_safetensors(tmp_path / "nothing.safetensors")


def test_no_torch_import() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import ledger._weights as w, numpy as np\n"
            "assert w.NumpySketch(1, 8)({'w': np.arange(8.0)}).shape == (8,)\n"
            "assert 'safetensors' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- count-sketch
def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == np.float64 and ours.shape == theirs.shape
    scale = max(float(np.abs(theirs).max()), 1e-300)
    assert float(np.abs(ours - theirs).max()) <= 1e-12 * scale


@pytest.mark.parametrize("start, stop", [(0, 10_000), (2**22 - 5, 2**22 + 5), (2**32 - 5, 2**32 + 5)])
@pytest.mark.parametrize("k", [2, 64, 256, 1 << 14])
def test_slots_equal_torch(start: int, stop: int, k: int) -> None:
    for seed, name in [(0, "w"), (12345, "layers.0.attn.q_proj.weight"), (-1, "é")]:
        ours = sketch_slots_numpy(seed, name, start, stop, k)
        assert ours.dtype == np.int64
        assert np.array_equal(ours, sketch_slots(seed, name, start, stop, k, "cpu").numpy())
        assert ours.min() >= 0 and ours.max() < 2 * k


@pytest.mark.parametrize("start", [0, 2**32 - 300_000, 2**40 + 3, 2**63 - 50_001])
@pytest.mark.parametrize("k", [2, 256, 1 << 20, 1 << 31, 1 << 32])
@pytest.mark.parametrize("n", [50_000, 700_000])
def test_slots_equal_the_definition(start: int, k: int, n: int) -> None:
    # hashed in uint32 in place (k ≤ 2^31), each run of 2^32 indices apart, runs of 2^18 on threads; the int64
    # definition otherwise; numpy integers as bounds hash as Python ones
    n = min(n, 2**63 - 1 - start)
    ours = sketch_slots_numpy(-7, "layers.0.w", np.int64(start), start + n, k)
    assert ours.dtype == np.int64
    assert np.array_equal(ours, sketch_hash(np.arange(start, start + n, dtype=np.int64), -7, "layers.0.w", k))
    assert sketch_slots_numpy(-7, "w", start + 5, start, k).shape == (0,)


def test_the_sketch_does_not_depend_on_the_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # runs of 2^18 coordinates, each bincounted on a thread and added in order, whatever the threads
    values = np.random.default_rng(5).standard_normal(1_500_000)
    threaded = NumpySketch(3, 256)({"w": values})
    monkeypatch.setattr(weights_module, "threads", lambda: 1)
    assert NumpySketch(3, 256)({"w": values}).tobytes() == threaded.tobytes()


def test_a_large_sketch_sums_a_chunk_at_once() -> None:
    # with 2k slots past a sixteenth of a run, per-run sums (2k floats each) would outweigh the run: a
    # genesis's sketch_k (up to 2^20) must not multiply the verifier's memory by the runs in a chunk (review)
    import tracemalloc

    values = np.random.default_rng(0).standard_normal(1 << 20)
    tracemalloc.start()
    try:
        NumpySketch(0, 1 << 20)({"w": values})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 56 << 20, f"{peak >> 20} MiB"  # slots 8 MiB and one bincount's 2k floats (16 MiB), twice


@pytest.fixture(scope="module")
def big() -> torch.Tensor:
    return torch.randn(5_000_000, generator=torch.Generator().manual_seed(7))  # crosses the 2**22 chunk size


@pytest.mark.parametrize("k", [256, 64])
@pytest.mark.parametrize("seed", [0, 2**40 + 3])
def test_sketch_equals_torch(k: int, seed: int, big: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(seed % 1000)
    small = {"a.weight": torch.randn(7, 3, generator=g), "a.bias": torch.randn(7, generator=g).double(),
             "scalar": torch.tensor(3.0), "empty": torch.zeros(0), "half": torch.randn(9, generator=g).half()}
    cases = [
        small,
        {"big": big},
        {"bf16": (torch.randn(1000, 33, generator=g) * 7).bfloat16()},
        {"steps": torch.randint(-(2**40), 2**40, (4097,), generator=g), "mask": torch.rand(50, generator=g) > 0.5,
         "u8": torch.randint(0, 256, (300,), generator=g, dtype=torch.uint8)},
    ]
    for tensors in cases:
        theirs = CountSketch(seed, k)(tensors)
        ours = NumpySketch(seed, k)({name: expected(t) for name, t in tensors.items()})
        assert_close(ours, theirs)


def test_sketch_of_read_weights_and_layouts(tmp_path: Path) -> None:
    tensors = {"w": (torch.randn(64, 48) * 3).bfloat16(), "b": torch.randn(48), "n": torch.tensor(5)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    assert_close(NumpySketch(9)(read_safetensors(tmp_path / "w.safetensors")), CountSketch(9)(tensors))
    # a non-contiguous array is sketched in C order, like its contiguous copy
    array = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
    assert np.array_equal(NumpySketch(1, 8)({"t": array.T}), NumpySketch(1, 8)({"t": np.ascontiguousarray(array.T)}))
    assert np.array_equal(NumpySketch(1, 8)({}), np.zeros(8))
    assert np.array_equal(NumpySketch(1, 8)({"e": np.zeros((0, 3))}), np.zeros(8))


def file_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tensors = {name: t for name, t in all_dtypes().items() if not name.startswith("f64")}  # f64: inf - inf
    tensors.update(big=torch.randn(3000, generator=g), big_bf16=torch.randn(2500, generator=g).bfloat16(),
                   tail=torch.randn(7, 11, generator=g).half())
    return tensors


@pytest.mark.parametrize("chunk", [1000, 1 << 22])
def test_file_fingerprints_equal_the_in_memory_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    chunk: int) -> None:
    # read chunk by chunk from the file, the sketch is NumpySketch's bit for bit (the same chunks in the same
    # order), the norms those of the whole arrays up to summation order; tensors not named are read too
    monkeypatch.setattr(weights_module, "_CHUNK", chunk)
    tensors = {n: t for n, t in file_tensors().items() if n not in ("f32", "f16", "bf16", "scalar")}  # finite ones
    save_file(tensors, str(tmp_path / "w.safetensors"))
    arrays = read_safetensors(tmp_path / "w.safetensors")
    order = ["tail", "big", "i8", "empty", "big_bf16", "bool", "é/unicode.weight"]
    sketcher = NumpySketch(11, 16)
    fingerprints = file_fingerprints(tmp_path / "w.safetensors", order, sketcher)
    assert fingerprints is not None
    norms, sketch = fingerprints
    assert sketch is not None and sketch.tobytes() == sketcher({n: arrays[n] for n in order}).tobytes()
    whole = np.array([np.linalg.norm(arrays[n].astype(np.float64).ravel()) for n in order])
    np.testing.assert_allclose(norms, whole, rtol=1e-14, atol=0)
    alone = file_fingerprints(tmp_path / "w.safetensors", order, None)
    assert alone is not None and alone[1] is None and alone[0].tobytes() == norms.tobytes()
    assert file_fingerprints(tmp_path / "w.safetensors", [*order, "absent"], sketcher) is None


def test_file_fingerprints_fail_on_what_numpy_cannot_read(tmp_path: Path) -> None:
    save_file({"fp8": torch.ones(4).to(torch.float8_e4m3fn), "w": torch.ones(3)}, str(tmp_path / "f8.safetensors"))
    with pytest.raises(FormatError, match="cannot be read without torch"):  # as read_safetensors does
        file_fingerprints(tmp_path / "f8.safetensors", ["w"], NumpySketch(0, 8))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "f8.safetensors").read_bytes()[:-2])
    with pytest.raises(FormatError, match="lies outside the file"):
        file_fingerprints(tmp_path / "cut.safetensors", ["w"], None)


def test_file_fingerprints_memory_stays_one_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    monkeypatch.setattr(weights_module, "_CHUNK", 1 << 14)
    save_numpy({"w": np.random.default_rng(0).standard_normal(1 << 20).astype("<f4")}, str(tmp_path / "w.safetensors"))
    tracemalloc.start()
    try:
        assert file_fingerprints(tmp_path / "w.safetensors", ["w"], NumpySketch(0, 64)) is not None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes traced for a 4 MiB tensor read in chunks of 64 KiB"  # the tensor: 4 MiB


def test_a_tensor_file_streams_what_read_safetensors_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_module, "_CHUNK", 1000)
    tensors = {n: t for n, t in file_tensors().items() if not n.startswith("f8")}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    arrays = read_safetensors(tmp_path / "w.safetensors")
    fds = len(list(Path("/proc/self/fd").iterdir()))
    with TensorFile(tmp_path / "w.safetensors") as file:
        raw = (tmp_path / "w.safetensors").read_bytes()
        header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        assert file.layout() == {n: (tuple(e["shape"]), e["dtype"]) for n, e in header.items() if n != "__metadata__"}
        for name, array in arrays.items():
            chunks = list(file.chunks(name))
            assert all(c.dtype == np.float64 and c.size <= 1000 for c in chunks)
            whole = np.concatenate(chunks) if chunks else np.zeros(0)
            assert same_bits(whole, array.astype(np.float64).ravel()), name
    assert len(list(Path("/proc/self/fd").iterdir())) == fds  # closed
    save_file({"fp8": torch.ones(4).to(torch.float8_e4m3fn)}, str(tmp_path / "f8.safetensors"))
    with pytest.raises(FormatError, match="cannot be read without torch"):
        TensorFile(tmp_path / "f8.safetensors")
    assert len(list(Path("/proc/self/fd").iterdir())) == fds


def test_documented_known_answers() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md").read_text()
    match = re.search(r"<!-- fingerprint-vectors:begin -->\s*```json\n(.*?)```", text, re.S)
    assert match
    vectors = json.loads(match.group(1))
    assert sketch_slots_numpy(1, "w", 0, 8, 8).tolist() == vectors["sketch_slots_seed1_k8_name_w_idx0-7"]
    values = np.array([1.0, -2, 3, -4, 5, -6, 7, -8], dtype=np.float32)
    assert NumpySketch(1, 8)({"w": values}).tolist() == vectors["sketch_seed1_k8_w=[1,-2,3,-4,5,-6,7,-8]"]


@pytest.mark.parametrize("k", [0, 1, 3, 100, -4])
def test_bad_k(k: int) -> None:
    with pytest.raises(ConfigurationError, match="power of two"):
        NumpySketch(0, k)
    with pytest.raises(ConfigurationError, match="power of two"):
        sketch_slots_numpy(0, "w", 0, 4, k)


def test_unsketchable_dtype() -> None:
    with pytest.raises(ConfigurationError, match="cannot be sketched"):
        NumpySketch(0)({"c": np.ones(3, dtype=np.complex64)})
