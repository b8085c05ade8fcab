"""The recorder's per-tensor norms: within the verifier's tolerance of the exact norm on tensors of
every kind and size, whichever path (numpy dot on CPU float32/float64 memory, torch elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ledger.hooks._norms import BLOCK, Norms


def exact(tensor: torch.Tensor) -> float:
    return float(np.linalg.norm(tensor.detach().double().reshape(-1).numpy()))


def test_norms_are_within_the_block_tolerance_of_the_exact_ones():
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.full((3_000_000,), 0.1),  # equal elements: the worst case of a float32 running sum
        torch.randn(4_000_001, generator=g),  # several blocks and a rest
        torch.randn(7, 5, generator=g),
        torch.randn(300, generator=g, dtype=torch.float64),
        torch.randn(70_000, generator=g).to(torch.bfloat16),
        torch.randn(513, generator=g).to(torch.float16),
        torch.arange(10),  # an integer buffer
        torch.randn(20, 30, generator=g).t(),  # not contiguous
        torch.zeros(0),
    ]
    plan = Norms(tensors)
    assert plan._host is not None and len(plan._host[0]) == 1 + 1 + 1 + 1  # small float32/64 blocks: views
    assert [len(rows) for _, rows in plan._rows] == [45, 61]  # the whole blocks of the large ones: rows
    got = plan.measure(tensors).value()
    want = np.array([exact(t) for t in tensors])
    rtol = BLOCK * 2.0**-24
    assert np.all(np.abs(got - want) <= rtol * want + 1e-300), (got, want)


@pytest.mark.parametrize("size", [100_000, 4 * BLOCK + 3])  # numpy views; rows of one torch reduction
def test_the_cpu_paths_read_the_live_tensor_at_each_measure(size):
    w = torch.ones(size)
    plan = Norms([w])
    first = plan.measure([w])
    w.mul_(2)  # an optimizer step updates the tensor in place
    second = plan.measure([w])
    assert first.value()[0] == np.sqrt(size) and second.value()[0] == 2 * np.sqrt(size)


def test_the_plan_is_not_current_once_a_tensor_shrinks_in_place():
    """``resize_`` to fewer elements keeps the address: the plan's views would read the old span."""
    t = torch.zeros(16)
    plan = Norms([t])
    assert plan.current([t])
    t.resize_(8)
    assert t.data_ptr() == plan._addresses[0][0] and not plan.current([t])
