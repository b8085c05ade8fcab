"""A small character-level transformer trained from scratch, recorded as a recipe, then verified.

``python examples/charlm.py --out demo-out`` trains it with ``ledger.hooks.train`` (every step
signed into a ledger, checkpoints for replay), saves the final weights as safetensors and runs
``ledger verify --key … --model … --recipe examples/charlm.py:recipe`` (init regenerated, intervals
replayed). The recipe object ``recipe`` is what a verifier names with
``--recipe examples/charlm.py:recipe`` to regenerate the init and replay intervals.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DATA = Path(__file__).resolve().parent / "data" / "python_reference.txt"


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class CharTransformer(nn.Module):
    """Token + position embeddings, a few blocks, a head tied to the token embedding."""

    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: fingerprinted once, as safetensors keeps it
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


@dataclass
class CharRecipe:
    """The recipe: model from a seed, AdamW with warm-up, deterministic batches of the shipped text."""

    dim: int = 64
    layers: int = 2
    heads: int = 4
    context: int = 64
    batch_size: int = 32
    lr: float = 3e-3

    def __post_init__(self) -> None:
        text = DATA.read_text()
        self.chars = sorted(set(text))
        self.data = torch.tensor([self.chars.index(c) for c in text], dtype=torch.long)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharTransformer(len(self.chars), self.dim, self.layers, self.heads, self.context)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.lr, betas=(0.9, 0.99), weight_decay=0.01)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=20)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = np.random.default_rng(step).integers(0, len(self.data) - self.context - 1, self.batch_size)
        x = torch.stack([self.data[s:s + self.context] for s in starts])
        y = torch.stack([self.data[s + 1:s + self.context + 1] for s in starts])
        return x, y

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> dict[str, float]:
        x, y = batch
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "bits_per_char": loss.item() / math.log(2)}


recipe = CharRecipe()


def main() -> int:
    from _outdir import fresh_output  # examples/_outdir.py (the script's folder is on sys.path)

    import ledger
    from ledger.hooks import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=40)
    args = parser.parse_args()
    fresh_output(args.out)
    private_key, public_key = ledger.generate_keypair(args.out / "keys" / "trainer")
    weights = args.out / "model.safetensors"
    path = train(recipe, steps=args.steps, path=args.out / "ledger", key=private_key, seed=args.seed,
                 checkpoint_every=args.checkpoint_every, final_weights=weights,
                 config={"example": "charlm", "steps": args.steps, **asdict(recipe)})
    frame = ledger.open(path).to_pandas()
    losses = frame.loc[frame.kind == "step", "loss"]
    print(f"trained {args.steps} steps: loss {losses.iloc[0]:.3f} → {losses.iloc[-1]:.3f}; ledger in {path}")
    recipe_spec = f"{Path(__file__).resolve()}:recipe"
    command = [sys.executable, "-m", "ledger", "verify", str(path), "--key", str(public_key), "--model", str(weights),
               "--recipe", recipe_spec]
    print("$ ledger verify", path, "--key", public_key, "--model", weights, "--recipe", recipe_spec, flush=True)
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
