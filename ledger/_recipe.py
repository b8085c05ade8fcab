"""Recipes: what init regeneration and replay need, and the one function that runs a step.

A recipe builds the model from a seed, builds the optimizer (and optionally a scheduler), gives the
deterministic batch of step ``s`` and performs one optimizer step. :func:`ledger.torch.run_step` runs
step ``s`` of a recipe for both ``ledger.hooks.train`` when recording and the verifier when
replaying, so the two execute the same code path. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import struct
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ledger._io import MiB, read_regular
from ledger.errors import ConfigurationError

STEP_SEED_DOMAIN = b"training-ledger/step-seed/v1\x00"
RECIPE_LIMIT = 16 * MiB  # a recipe is source code, not data


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


def load_recipe(spec: str) -> tuple[Any, bytes]:
    """Import ``FILE.py:NAME`` (only that file) and return (recipe, SHA-256 of the file).
    NAME is an object implementing :class:`Recipe` or a zero-argument callable returning one."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file or not name:
        raise ConfigurationError(f"recipe must be given as FILE.py:NAME, not {spec!r}")
    path = Path(file)
    try:
        source = read_regular(path, what="recipe file", limit=RECIPE_LIMIT, error=ConfigurationError)
    except FileNotFoundError:
        raise ConfigurationError(f"recipe file {path} does not exist") from None
    module_name = f"_ledger_recipe_{hashlib.sha256(source).hexdigest()[:12]}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigurationError(f"cannot import recipe file {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # verifying writes no __pycache__
    try:
        loader_spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        del sys.modules[module_name]
        hint = " (init regeneration and replay need torch: pip install 'training-ledger[torch]')" \
            if exc.name == "torch" else ""
        raise ConfigurationError(f"recipe file {path} could not be imported: no module named {exc.name!r}{hint}") \
            from exc
    except (Exception, SystemExit) as exc:  # a recipe that calls sys.exit() while imported cannot be used either
        del sys.modules[module_name]
        raise ConfigurationError(f"recipe file {path} raised while being imported: "
                                 f"{type(exc).__name__}: {exc}") from exc
    finally:
        sys.dont_write_bytecode = write_bytecode
    try:
        obj = getattr(module, name)
    except AttributeError:
        raise ConfigurationError(f"recipe file {path} defines no {name!r}") from None
    recipe = obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Recipe)) else obj
    if not isinstance(recipe, Recipe):
        raise ConfigurationError(f"{spec} is not a recipe (needs build_model, build_optimizer, batch, train_step)")
    return recipe, hashlib.sha256(source).digest()
