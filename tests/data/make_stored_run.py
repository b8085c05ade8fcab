"""Write tests/data/stored-run/: a small recorded run kept in the repository, verified by the
base-install test (tests/test_base_install.py) where torch is not installed.

A two-layer MLP trained 20 steps with AdamW, checkpoints every 10 steps (init, 9, 19), a bfloat16
buffer (bf16 has no numpy dtype: the base install reads it as uint16 and widens it), sealed with the
final weights. Run it again only when the format changes: `python tests/data/make_stored_run.py`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from conftest import FIXED_SEED  # noqa: E402

from ledger import Signer  # noqa: E402
from ledger._crypto import public_key_pem  # noqa: E402
from ledger.hooks import FingerprintOptions, Recorder  # noqa: E402


class Net(nn.Module):
    """An MLP with a LayerNorm and a fixed bf16 scale buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 1)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.norm(self.up(x))) * self.scale.float())


def main() -> None:
    out = HERE / "stored-run"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    signer = Signer.from_seed(FIXED_SEED)
    (out / "trainer.pub").write_bytes(public_key_pem(signer.public.raw))
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    rec = Recorder(out / "ledger", model=model, optimizer=opt, key=signer, seed=0, checkpoint_every=10,
                   fingerprints=FingerprintOptions(sketch=1, digests="every"), config={"lr": 1e-2})
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(16, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.step(loss=loss, batch=x)
    rec.close(final_weights=out / "model.safetensors")


if __name__ == "__main__":
    main()
