"""The recorder's per-step norm plan rebuilt after one tensor moved (``p.data = other``): made again
whole, against keeping the views of the tensors that did not move (``Norms(tensors, previous=plan)``,
what ``Recorder.step`` does). 48 matrices of 4096×1024 and 96 vectors of 1024 (201 M elements), in
float32 (numpy views of CPU memory, rows of one reduction) and bf16 (torch blocks: the path CUDA
tensors take). Medians of 7 rebuilds. Figures only, no assertions.

    python benchmarks/norm_plan_rebuild.py      # ~10 s, ~1.3 GB of memory
"""

from __future__ import annotations

import statistics
import time

import torch

from ledger.hooks._norms import Norms


def main() -> None:
    torch.manual_seed(0)
    for dtype, label in ((torch.float32, "float32 (numpy views, rows)"), (torch.bfloat16, "bf16 (torch blocks)")):
        tensors = [torch.randn(4096, 1024).to(dtype) for _ in range(48)] + [torch.randn(1024).to(dtype)
                                                                            for _ in range(96)]
        whole, kept = [], []
        plan = Norms(tensors)
        for _ in range(7):
            tensors[5] = tensors[5].clone()  # one tensor's storage replaced
            began = time.perf_counter()
            Norms(tensors)
            middle = time.perf_counter()
            plan = Norms(tensors, previous=plan)
            whole.append(middle - began)
            kept.append(time.perf_counter() - middle)
        print(f"{label}: {len(tensors)} tensors, {sum(t.numel() for t in tensors) / 1e6:.0f} M elements; rebuilt "
              f"whole {statistics.median(whole) * 1e3:.2f} ms, keeping the others' views "
              f"{statistics.median(kept) * 1e3:.2f} ms ({statistics.median(whole) / statistics.median(kept):.1f}×)")


if __name__ == "__main__":
    main()
