"""Tiny recipes for the tests (fast on 2 CPU cores)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class TinyRecipe:
    """An MLP with a LayerNorm, AdamW and a step scheduler, on synthetic regression data."""

    def __init__(self, width: int = 16, lr: float = 1e-2, dropout: float = 0.1) -> None:
        self.width, self.lr, self.dropout = width, lr, dropout

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, self.width), nn.LayerNorm(self.width), nn.GELU(),
                             nn.Dropout(self.dropout), nn.Linear(self.width, 1))

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(16, 8, generator=g)
        return x, x.sum(dim=1, keepdim=True).sin()

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> dict[str, float]:
        x, y = batch
        model.train()
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}


recipe = TinyRecipe()


class BatchNormRecipe(TinyRecipe):
    """TinyRecipe with a BatchNorm1d: buffers (running statistics) that move at every training step."""

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, self.width), nn.BatchNorm1d(self.width), nn.GELU(), nn.Linear(self.width, 1))
