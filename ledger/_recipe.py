"""Recipes: what init regeneration and replay need, and the one function that runs a step.

A recipe builds the model from a seed, builds the optimizer (and optionally a scheduler), gives the
deterministic batch of step ``s`` and performs one optimizer step. ``run_step`` is used both by
``ledger.hooks.train`` when recording and by the verifier when replaying, so the two execute the
same code path. torch is imported only inside the functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import struct
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ledger.errors import ConfigurationError

STEP_SEED_DOMAIN = b"training-ledger/step-seed/v1\x00"


@runtime_checkable
class Recipe(Protocol):
    """What a training run must provide to be regenerated and replayed (``build_scheduler``
    is optional)."""

    def build_model(self, seed: int) -> Any:
        """A freshly initialised model; must seed itself from ``seed``."""

    def build_optimizer(self, model: Any) -> Any:
        """The optimizer over the model's parameters."""

    def batch(self, step: int) -> Any:
        """The deterministic data of optimizer step ``step`` (0-based)."""

    def train_step(self, model: Any, optimizer: Any, batch: Any) -> dict[str, float]:
        """One optimizer step (zero_grad, forward, backward, step); returns metrics incl. ``loss``."""


def step_seed(seed: int, step: int) -> int:
    """The seed every RNG gets before step ``step`` of a recipe run (so any interval can be
    replayed without carrying RNG state along)."""
    digest = hashlib.sha256(STEP_SEED_DOMAIN + struct.pack(">qq", seed, step)).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python's random and numpy's global generator."""
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def deterministic(seed: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Make torch deterministic: deterministic algorithms, a fixed CPU thread count (default:
    the current one) and, when ``seed`` is given, every RNG seeded. Returns the settings, which
    genesis records and replay re-applies."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if seed is not None:
        seed_everything(seed)
    return {"deterministic_algorithms": True, "threads": threads}


def build_scheduler(recipe: Any, optimizer: Any) -> Any:
    """The recipe's scheduler, or None when it defines none."""
    builder = getattr(recipe, "build_scheduler", None)
    return builder(optimizer) if builder is not None else None


def run_step(recipe: Any, model: Any, optimizer: Any, scheduler: Any, seed: int,
             step: int) -> tuple[dict[str, float], Any]:
    """Run optimizer step ``step`` of a recipe: seed every RNG with :func:`step_seed`, take
    ``recipe.batch(step)``, call ``recipe.train_step``, then advance the scheduler.
    Returns (metrics as floats, the batch)."""
    seed_everything(step_seed(seed, step))
    batch = recipe.batch(step)
    metrics = recipe.train_step(model, optimizer, batch)
    if scheduler is not None:
        scheduler.step()
    if not isinstance(metrics, dict) or "loss" not in metrics:
        raise ConfigurationError("recipe.train_step must return a dict of metrics with a 'loss'")
    return {name: float(value) for name, value in metrics.items()}, batch


def load_recipe(spec: str) -> tuple[Any, bytes]:
    """Import ``FILE.py:NAME`` (only that file) and return (recipe, SHA-256 of the file).
    NAME is an object implementing :class:`Recipe` or a zero-argument callable returning one."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name:
        raise ConfigurationError(f"recipe must be given as FILE.py:NAME, not {spec!r}")
    path = Path(file)
    if not path.is_file():
        raise ConfigurationError(f"recipe file {path} does not exist")
    source = path.read_bytes()
    module_name = f"_ledger_recipe_{hashlib.sha256(source).hexdigest()[:12]}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigurationError(f"cannot import recipe file {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    loader_spec.loader.exec_module(module)
    try:
        obj = getattr(module, name)
    except AttributeError:
        raise ConfigurationError(f"recipe file {path} defines no {name!r}") from None
    recipe = obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Recipe)) else obj
    if not isinstance(recipe, Recipe):
        raise ConfigurationError(f"{spec} is not a recipe (needs build_model, build_optimizer, batch, train_step)")
    return recipe, hashlib.sha256(source).digest()
