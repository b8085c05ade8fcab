"""Known answers for tensor digests, model digests, sketches and batch digests (docs/FORMAT.md §10)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ledger import FormatError
from ledger._fingerprint import model_digest, safetensors_digests, tensor_digest
from ledger.torch import CountSketch, batch_digest, sketch_slots, torch_digests

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def vectors() -> dict:
    text = DOC.read_text()
    match = re.search(r"<!-- fingerprint-vectors:begin -->\s*```json\n(.*?)```", text, re.S)
    assert match
    return json.loads(match.group(1))


def test_documented_known_answers():
    v = vectors()
    d1 = tensor_digest("w", "F32", [2], np.array([1.0, -2.0], dtype="<f4").tobytes())
    d2 = torch_digests({"b": torch.tensor(1.5, dtype=torch.bfloat16)})["b"]
    assert d1.hex() == v["tensor_w_F32_[2]_[1.0,-2.0]"] and d2.hex() == v["tensor_b_BF16_[]_1.5"]
    assert model_digest({"w": d1, "b": d2}).hex() == v["model_{w,b}"]
    assert sketch_slots(1, "w", 0, 8, 8, "cpu").tolist() == v["sketch_slots_seed1_k8_name_w_idx0-7"]
    sketch = CountSketch(1, 8)({"w": torch.tensor([1.0, -2, 3, -4, 5, -6, 7, -8])})
    assert sketch.tolist() == v["sketch_seed1_k8_w=[1,-2,3,-4,5,-6,7,-8]"]
    assert batch_digest((torch.tensor([[1, 2]]), torch.tensor([0.5]))).hex() == v["batch_(int64[[1,2]],float32[0.5])"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.bool])
def test_torch_and_safetensors_digests_agree(tmp_path, dtype):
    tensors = {"a.weight": (torch.randn(3, 5) * 10).to(dtype), "é/unicode": torch.zeros(0).to(dtype),
               "scalar": torch.tensor(1).to(dtype), "t": torch.randn(4, 6).t().to(dtype)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "w.safetensors"))
    assert torch_digests(tensors) == safetensors_digests(tmp_path / "w.safetensors")


def test_sharded_index_and_bad_files(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "m-1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "m-2.safetensors"))
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    assert safetensors_digests(tmp_path / "m.safetensors.index.json") == torch_digests(
        {"a": torch.ones(2), "b": torch.zeros(3)})
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(FormatError, match="not a safetensors file"):
        safetensors_digests(tmp_path / "junk.safetensors")
    good = (tmp_path / "m-1.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[:-4])
    with pytest.raises(FormatError, match="outside the file"):
        safetensors_digests(tmp_path / "cut.safetensors")


def test_a_one_ulp_change_changes_the_digest():
    a = torch.randn(10)
    b = a.clone()
    b[7] = torch.nextafter(b[7], torch.tensor(10.0))
    assert torch_digests({"x": a}) != torch_digests({"x": b})
    assert torch_digests({"x": a}) != torch_digests({"y": a})  # the name is bound
    assert torch_digests({"x": a}) != torch_digests({"x": a.reshape(2, 5)})  # so is the shape


def test_tensor_bytes_reads_only_plain_memory():
    """Tensors whose elements are not plain bytes at their address (a zero tensor; a pending
    negation) are materialised or refused with one line, never read in place (review: a zero tensor
    or a wrapper subclass made the in-place read crash the process)."""
    import pytest
    import torch

    from ledger.errors import ConfigurationError
    from ledger.torch import in_memory, tensor_bytes

    negated = torch.tensor([1 + 2j, 3 - 4j]).conj().imag
    assert negated.is_neg() and not in_memory(negated)
    assert bytes(tensor_bytes(negated)) == bytes(tensor_bytes(negated.resolve_neg().clone()))
    zeros = torch._efficientzerotensor(4)
    with pytest.raises(ConfigurationError, match="cannot be fingerprinted"):
        tensor_bytes(zeros)
    assert in_memory(torch.ones(3)) and not in_memory(torch.ones(0))
