"""The blocked tensor digest ``tensor-blocked/v1`` (ledger/_blocked.py, docs/FORMAT.md §10.1): its
known answers, recomputed with plain hashlib; any split of a tensor into contiguous pieces combines
to the one-process digest, and any gap, overlap or malformed piece is refused; files and tensors agree;
and verify compares a ledger's digests in the scheme its genesis states."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXED_SEED
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_provenance import RECIPE_SPEC, record

import ledger
from ledger import Kind, LedgerWriter, Signer
from ledger._blocked import (
    BLOCK_ELEMENTS,
    TENSOR_BLOCKED_V1,
    TENSOR_V1,
    Fragment,
    Piece,
    blocked_digest,
    check_scheme,
    combine,
    piece,
    safetensors_blocked_digests,
    safetensors_digests_as,
)
from ledger._fingerprint import model_digest, safetensors_digests
from ledger._schema import FingerprintPolicy
from ledger.errors import ConfigurationError, FormatError
from ledger.torch import torch_digests
from ledger.verify import Status, verify_ledger

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
B = BLOCK_ELEMENTS
SIGNER = Signer.from_seed(FIXED_SEED)


def vectors() -> dict[str, Any]:
    match = re.search(r"<!-- blocked-vectors:begin -->\s*```json\n(.*?)```", DOC.read_text(), re.S)
    assert match
    return dict(json.loads(match.group(1)))


def spec_digest(name: str, dtype: str, shape: list[int], data: bytes, size: int) -> tuple[bytes, list[bytes]]:
    """docs/FORMAT.md §10.1 written out with hashlib alone."""
    n = int(np.prod(shape)) if shape else 1
    blocks = [hashlib.sha256(b"training-ledger/tensor-block/v1\0" + data[j * B * size:(j + 1) * B * size]).digest()
              for j in range(-(-n // B))]
    head = (b"training-ledger/tensor-blocked/v1\0" + struct.pack(">I", len(name.encode())) + name.encode()
            + struct.pack(">B", len(dtype)) + dtype.encode() + struct.pack(">B", len(shape))
            + b"".join(struct.pack(">Q", d) for d in shape) + struct.pack(">Q", n * size) + struct.pack(">I", B)
            + struct.pack(">Q", len(blocks)))
    return hashlib.sha256(head + b"".join(blocks)).digest(), blocks


def test_documented_known_answers() -> None:
    v = vectors()
    w = np.array([1.0, -2.0], dtype="<f4").tobytes()
    ramp = bytes(i % 251 for i in range(2 * B + 5))
    d_w, d_b = blocked_digest("w", "F32", [2], w), torch_digests({"b": torch.tensor(1.5, dtype=torch.bfloat16)},
                                                                 TENSOR_BLOCKED_V1)["b"]
    assert d_w == spec_digest("w", "F32", [2], w, 4)[0]
    assert d_w.hex() == v["blocked_w_F32_[2]_[1.0,-2.0]"] and d_b.hex() == v["blocked_b_BF16_[]_1.5"]
    assert blocked_digest("e", "F32", [0, 3], b"").hex() == v["blocked_e_F32_[0,3]_empty"]
    digest, blocks = spec_digest("ramp", "U8", [2 * B + 5], ramp, 1)
    assert [h.hex() for h in blocks] == v["blocked_ramp_U8_[131077]_i_mod_251_block_hashes"]
    assert blocked_digest("ramp", "U8", [2 * B + 5], ramp).hex() == digest.hex() \
        == v["blocked_ramp_U8_[131077]_i_mod_251"]
    assert model_digest({"w": d_w, "b": d_b}).hex() == v["model_{w,b}_blocked"]
    assert d_w != torch_digests({"w": torch.tensor([1.0, -2.0])})["w"]  # another scheme, another digest


def test_threads_do_not_change_the_digest() -> None:
    data = np.random.default_rng(0).integers(0, 255, 200 * B, dtype=np.uint8).tobytes()
    one = blocked_digest("x", "U8", [200 * B], data, workers=1)
    assert blocked_digest("x", "U8", [200 * B], data, workers=4) == one == spec_digest("x", "U8", [200 * B], data, 1)[0]


DTYPES = {"U8": 1, "BF16": 2, "F32": 4, "F64": 8}


@st.composite
def splits(draw: Any) -> tuple[str, int, bytes, list[int]]:
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    total = draw(st.sampled_from([0, 1, 7, B - 1, B, B + 1, 2 * B, 3 * B + 17]))
    cuts = draw(st.lists(st.integers(0, total), max_size=8))
    data = random.Random(total).randbytes(total * DTYPES[dtype])
    return dtype, total, data, sorted({0, total, *cuts})


def pieces_of(dtype: str, total: int, data: bytes, bounds: list[int]) -> list[Piece]:
    size = DTYPES[dtype]
    return [piece(dtype, total, a, data[a * size:b * size]) for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=60, deadline=None)
@given(splits(), st.randoms(use_true_random=False))
def test_any_split_combines_to_the_one_process_digest(case: tuple[str, int, bytes, list[int]], rnd: Any) -> None:
    dtype, total, data, bounds = case
    pieces = pieces_of(dtype, total, data, bounds)
    rnd.shuffle(pieces)  # ranks arrive in any order
    assert combine("t", dtype, [total], pieces) == blocked_digest("t", dtype, [total], data)
    assert all(len(f.data) < B * DTYPES[dtype] for p in pieces for f in p.fragments)  # under one block travels


@settings(max_examples=40, deadline=None)
@given(splits(), st.data())
def test_a_gap_an_overlap_or_a_changed_byte_is_caught(case: tuple[str, int, bytes, list[int]], data: Any) -> None:
    dtype, total, raw, bounds = case
    pieces = pieces_of(dtype, total, raw, bounds)
    if total:
        i = data.draw(st.integers(0, len(pieces) - 1))
        with pytest.raises(ConfigurationError, match="covered by no rank"):
            combine("t", dtype, [total], pieces[:i] + pieces[i + 1:])
        with pytest.raises(ConfigurationError, match="overlap"):
            combine("t", dtype, [total], [*pieces, pieces[i]])
        at = data.draw(st.integers(0, total * DTYPES[dtype] - 1))
        changed = bytearray(raw)
        changed[at] ^= 1
        assert combine("t", dtype, [total], pieces_of(dtype, total, bytes(changed), bounds)) \
            != combine("t", dtype, [total], pieces)


def test_malformed_pieces_are_refused() -> None:
    data = bytes(range(256)) * (3 * B // 256)
    good = piece("U8", 3 * B, 10, data[10:])
    head = piece("U8", 3 * B, 0, data[:10])
    for bad in (Piece(good.start, good.stop, good.first_block + 1, good.hashes, good.fragments),
                Piece(good.start, good.stop, good.first_block, good.hashes[:-1], good.fragments),
                Piece(good.start, good.stop, good.first_block, good.hashes, (Fragment(11, good.fragments[0].data),)),
                Piece(good.start, good.stop, good.first_block, good.hashes, ())):
        with pytest.raises(ConfigurationError, match="malformed"):
            combine("t", "U8", [3 * B], [head, bad])
    with pytest.raises(ConfigurationError, match="outside a tensor"):
        piece("U8", 3 * B, 3 * B - 1, data[:2])
    with pytest.raises(ConfigurationError, match="whole number"):
        piece("F32", 3, 0, b"\0" * 5)


def test_files_and_tensors_agree(tmp_path: Path) -> None:
    tensors = {"big": torch.randn(5, B + 3), "b": torch.randn(7).to(torch.bfloat16), "empty": torch.zeros(0, 4),
               "s": torch.tensor(3, dtype=torch.int64), "é": torch.ones(2, dtype=torch.bool)}
    save_file({k: v for k, v in tensors.items() if k in ("big", "b")}, str(tmp_path / "a.safetensors"))
    save_file({k: v for k, v in tensors.items() if k not in ("big", "b")}, str(tmp_path / "b.safetensors"))
    index = {"weight_map": {k: "a.safetensors" if k in ("big", "b") else "b.safetensors" for k in tensors}}
    (tmp_path / "m.index.json").write_text(json.dumps(index))
    blocked = torch_digests(tensors, TENSOR_BLOCKED_V1)
    assert safetensors_blocked_digests(tmp_path / "m.index.json") == blocked
    assert safetensors_digests_as(tmp_path / "m.index.json", TENSOR_BLOCKED_V1) == blocked
    index_file = tmp_path / "m.index.json"
    assert safetensors_digests_as(index_file, TENSOR_V1) == safetensors_digests(index_file)
    (tmp_path / "bad.safetensors").write_bytes(b"\x04" + b"\0" * 7 + b"{}")
    with pytest.raises(FormatError):
        safetensors_blocked_digests(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigurationError, match="unknown tensor digest scheme"):
        check_scheme("tensor/v2")


def test_the_genesis_field() -> None:
    policy = FingerprintPolicy(["w"], "auto", 256, 1, "auto", 0.01)
    assert "tensor_digest" not in policy.to_body() and FingerprintPolicy.from_body(policy.to_body()) == policy
    blocked = FingerprintPolicy(["w"], "auto", 256, 1, "auto", 0.01, tensor_digest=TENSOR_BLOCKED_V1)
    assert blocked.to_body()["tensor_digest"] == TENSOR_BLOCKED_V1
    assert FingerprintPolicy.from_body(blocked.to_body()).tensor_digest == TENSOR_BLOCKED_V1
    with pytest.raises(FormatError, match="'tensor_digest'"):
        FingerprintPolicy.from_body({**blocked.to_body(), "tensor_digest": "tensor/v9"})


# ----------------------------------------------------------------------------- verify follows the genesis
def as_blocked(src: Path, dst: Path, *, convert: bool = True, step_digests: bool = True) -> Path:
    """The same run re-signed with genesis stating tensor-blocked/v1 and its init, step and seal
    digests rehashed in that scheme from the checkpoint and final files (``convert=False``: left
    tensor/v1; ``step_digests=False``: step entries carry none, so the last state is a checkpoint's)."""
    entries = list(ledger.open(src).entries())
    files = {e.step: src / e.body()["path"] / "model.safetensors" for e in entries if e.kind is Kind.CHECKPOINT}
    genesis = {k: v for k, v in entries[0].body().items()
               if k not in ("format", "run_id", "created_ns", "public_key", "key_id", "payload_type")}
    genesis["fingerprints"] = {**genesis["fingerprints"], "tensor_digest": TENSOR_BLOCKED_V1}
    order = genesis["fingerprints"]["tensor_order"]
    if convert:
        init = safetensors_blocked_digests(files[-1])
        genesis["init"] = {**genesis["init"], "tensor_digests": init, "model_digest": model_digest(init)}
    writer = LedgerWriter.create(dst, SIGNER, genesis=genesis)
    for entry in entries[1:-1]:
        body = entry.body()
        if entry.kind is Kind.STEP and body.get("tensor_digests") is not None:
            if not step_digests or (convert and entry.step not in files):  # no weights to rehash
                body = {k: v for k, v in body.items() if k != "tensor_digests"}
            elif convert:
                digests = safetensors_blocked_digests(files[entry.step])
                body = {**body, "tensor_digests": b"".join(digests[n] for n in order)}
        writer.append(entry.kind, entry.step, body)
    seal = {k: v for k, v in entries[-1].body().items() if k not in ("entry_count", "head", "tree_root")}
    if convert:
        final = safetensors_blocked_digests(src.parent / f"{src.name}.safetensors")
        seal["final"] = {**seal["final"], "tensor_digests": final, "model_digest": model_digest(final)}
    writer.seal(seal, step=entries[-1].step)
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    return dst


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return record(tmp_path_factory.mktemp("honest") / "L")


@pytest.mark.slow
@pytest.mark.parametrize("step_digests", [True, False])
def test_verify_compares_in_the_scheme_genesis_states(honest: Path, tmp_path: Path, step_digests: bool) -> None:
    final = honest.parent / "L.safetensors"
    report = verify_ledger(as_blocked(honest, tmp_path / "B", step_digests=step_digests), key=SIGNER.public,
                           model=final, recipe=RECIPE_SPEC, replay=10, replay_seed=1)
    checks = {c.name: c.status for c in report.checks}
    assert report.verdict == "pass", report.to_dict()["checks"]
    assert all(checks[n] is Status.PASS for n in ("model", "checkpoints", "init", "continuity", "replay")), checks
    assert "the sealed weights equal" in report.check("continuity").detail


@pytest.mark.slow
def test_digests_of_the_other_scheme_fail(honest: Path, tmp_path: Path) -> None:
    report = verify_ledger(as_blocked(honest, tmp_path / "M", convert=False), key=SIGNER.public,
                           model=honest.parent / "L.safetensors", recipe=RECIPE_SPEC, replay=10, replay_seed=1)
    assert report.check("model").status is Status.FAIL  # tensor/v1 digests read as tensor-blocked/v1
    assert report.check("checkpoints").status is Status.FAIL
    assert "init fingerprint" in report.check("checkpoints").detail
    assert report.check("init").status is Status.FAIL
