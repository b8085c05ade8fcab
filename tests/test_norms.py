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


def test_a_rebuild_keeps_the_views_of_the_tensors_that_did_not_move():
    """A plan rebuilt after one tensor moved (``p.data = other``) takes the other tensors' views from
    the plan before instead of making them again, and its norms are the live tensors'."""
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4 * BLOCK + 3, generator=g), torch.randn(300, generator=g),
               torch.randn(70_000, generator=g).to(torch.bfloat16), torch.arange(5)]
    plan = Norms(tensors)
    moved = [tensors[0], torch.randn(300, generator=g), tensors[2], tensors[3]]
    assert not plan.current(moved)
    again = Norms(moved, previous=plan)
    assert again._pieces[0] is plan._pieces[0] and again._pieces[2] is plan._pieces[2]  # kept
    assert again._pieces[1] is not plan._pieces[1]  # made again: its address changed
    got = again.measure(moved).value()
    want = np.array([exact(t) for t in moved])
    assert np.all(np.abs(got - want) <= BLOCK * 2.0**-24 * want + 1e-300), (got, want)
