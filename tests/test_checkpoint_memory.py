"""A checkpoint holds one copy of the training state (its snapshot) and no second one while it is
hashed and written."""

from __future__ import annotations

import tracemalloc

import torch
from safetensors.torch import load_file

from ledger.torch import snapshot, write_checkpoint


def test_writing_a_checkpoint_allocates_no_second_copy_of_the_state(tmp_path):
    model = torch.nn.Linear(2048, 2048)  # 4.2 M parameters: 16 MiB of float32
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 2048)).sum().backward()
    opt.step()  # optimizer state: two more tensors of the same size
    snap = snapshot(0, model, opt)
    state_bytes = sum(t.nbytes for t in snap.model.values()) + sum(t.nbytes for t in snap.optimizer_tensors.values())
    tracemalloc.start()
    try:
        directory, _ = write_checkpoint(snap, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert state_bytes > 48 * 2**20
    assert peak < state_bytes / 20, f"writing allocated {peak / 2**20:.1f} MiB for {state_bytes / 2**20:.0f} MiB"
    assert torch.equal(load_file(str(directory / "model.safetensors"))["weight"], model.weight.detach())
