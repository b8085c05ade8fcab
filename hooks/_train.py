"""A fully recorded, deterministic run from a recipe."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ledger.hooks._recorder import Recorder
from ledger.torch import RESEED_PER_STEP, build_scheduler, deterministic, run_step


def train(recipe: Any, *, steps: int, path: str | os.PathLike[str], key: Any, seed: int,
          checkpoint_every: int | None = None, final_weights: str | os.PathLike[str] | None = None,
          config: Mapping[str, Any] | None = None, threads: int | None = None, **recorder_options: Any) -> Path:
    """Build the model from ``recipe`` and ``seed``, train ``steps`` steps through
    :func:`ledger.torch.run_step` (step s consumes ``recipe.batch(s)``) with deterministic algorithms and
    a fixed thread count, record everything, and seal with the final weights. Genesis ``determinism``
    records the thread count and the RNG discipline (``"rng": "reseed-per-step/v1"``: every RNG is
    reseeded before each step), which replay follows. Returns the ledger path."""
    settings = {**deterministic(threads=threads), "rng": RESEED_PER_STEP}
    model = recipe.build_model(seed)
    optimizer = recipe.build_optimizer(model)
    scheduler = build_scheduler(recipe, optimizer)
    recorder = Recorder(path, model=model, optimizer=optimizer, scheduler=scheduler, key=key, seed=seed,
                        checkpoint_every=checkpoint_every, config=config, recipe=recipe, determinism=settings,
                        **recorder_options)
    with recorder:
        for step in range(steps):
            metrics, batch = run_step(recipe, model, optimizer, scheduler, seed, step)
            recorder.step(batch=batch, **metrics)
        recorder.close(final_weights=final_weights)
    return Path(path)
