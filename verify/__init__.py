"""Checking a ledger: each check is a small unit with a name and a result.

At this stage: ``chain``, ``signatures`` and ``seal`` (see docs/VERIFYING.md). Later checks
(model, checkpoints, init, continuity, replay, independence) join the same :class:`Report`.
This package never imports ``ledger.hooks``.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import pyarrow.compute as pc

from ledger._crypto import PublicKey, load_public_key
from ledger._environment import environment
from ledger._reader import Ledger
from ledger._recipe import load_recipe
from ledger._record import Kind
from ledger._state import restore_weights_only
from ledger.errors import ConfigurationError
from ledger.verify._continuity import check_continuity, movement
from ledger.verify._independence import check_independence
from ledger.verify._integrity import check_chain, check_seal, check_signatures, load
from ledger.verify._model import check_model
from ledger.verify._provenance import check_checkpoints, check_init
from ledger.verify._replay import check_replay
from ledger.verify._report_html import render_html
from ledger.verify._result import CheckResult, Report
from ledger.verify._run import build

CHECKS = ("chain", "signatures", "seal", "model", "checkpoints", "init", "continuity", "replay", "independence")

Progress = Callable[[str, int, int], None]


def verify_ledger(path: str | os.PathLike[str], *, key: PublicKey | str | os.PathLike[str] | None = None,
                  model: str | os.PathLike[str] | None = None, sample: int | None = None,
                  sample_seed: int | None = None, require: Iterable[str] = (), workers: int | None = None,
                  progress: Progress | None = None, checkpoints: str | os.PathLike[str] | None = None,
                  recipe: Any = None, replay: int = 2, replay_seed: int | None = None,
                  tolerance: float | None = None, against: Iterable[str | os.PathLike[str]] = ()) -> Report:
    """Run every check on the ledger at ``path`` and return the report (never raises for a
    damaged ledger: that is a failed check). ``key`` is the trainer's public key (a path or a
    :class:`~ledger.PublicKey`); without it the key embedded in genesis is used and
    ``signatures`` is at best a warning. ``sample=N`` checks the head and N random entries'
    signatures and bodies only. ``model`` is the released weights (safetensors file or sharded
    ``*.index.json``), compared with the seal's final weights. ``require`` names checks that must
    pass (a warn or skip then fails). ``checkpoints`` is a directory holding the checkpoints (named
    by state digest) when they are not inside the ledger. ``recipe`` (``"FILE.py:NAME"`` or a recipe
    object) enables ``init`` and ``replay``; ``replay`` random intervals are re-executed besides the
    anomalies and the largest update, drawn with ``replay_seed`` (fresh randomness when None);
    ``tolerance`` forces the relative rule with that ρ. ``against`` names foreign weight files to
    test lineage against (``independence``).
    """
    required = list(require)
    unknown = sorted(set(required) - set(CHECKS))
    if unknown:
        raise ConfigurationError(f"unknown check name(s) for --require: {', '.join(unknown)} "
                                 f"(known: {', '.join(CHECKS)})")
    if sample is not None and sample < 0:
        raise ConfigurationError("--sample must be zero or more")
    public = load_public_key(key) if key is not None and not isinstance(key, PublicKey) else key
    if model is not None and not os.path.exists(model):
        raise ConfigurationError(f"weights file {model} does not exist")
    if checkpoints is not None and not os.path.isdir(checkpoints):
        raise ConfigurationError(f"checkpoint directory {checkpoints} does not exist")
    foreign = list(against)
    for file in foreign:
        if not os.path.exists(file):
            raise ConfigurationError(f"--against file {file} does not exist")
    if replay < 0 or (tolerance is not None and tolerance <= 0):
        raise ConfigurationError("--replay must be ≥ 0 and --tolerance > 0")
    recipe_digest = None
    if isinstance(recipe, str):
        recipe, recipe_digest = load_recipe(recipe)
    ledger = Ledger(path)
    seed = secrets.randbits(64) if sample_seed is None else sample_seed
    rng = random.Random(seed)
    loaded = load(ledger)
    checks: list[CheckResult] = [
        check_chain(loaded, sample=sample, rng=rng, progress=progress),
        check_signatures(loaded, public, sample=sample, rng=rng, workers=workers, progress=progress),
        check_seal(loaded, ledger),
        check_model(loaded.records, model),
    ]
    checks += _provenance_checks(loaded, ledger, checkpoints, recipe, recipe_digest, replay,
                                 secrets.randbits(63) if replay_seed is None else replay_seed, tolerance, progress,
                                 model, foreign)
    kinds = loaded.table["kind"]
    last_kind = kinds[-1].as_py() if len(kinds) else None
    genesis = loaded.genesis or {}
    facts = {
        "path": str(ledger.path),
        "run_id": genesis.get("run_id"),
        "entries": len(loaded.records),
        "steps": pc.sum(pc.equal(kinds, Kind.STEP.label)).as_py() or 0,
        "sealed": last_kind == Kind.SEAL.label,
        "head": loaded.hashes[-1].hex() if loaded.hashes else None,
        "key_id": genesis["key_id"].hex() if isinstance(genesis.get("key_id"), bytes) else None,
        "torn_tail_bytes": len(ledger.wal_torn),
    }
    if sample is not None:
        facts["sample"] = {"size": sample, "seed": seed}
    return Report(tuple(checks), facts).require(required)


def _provenance_checks(loaded: Any, ledger: Ledger, checkpoint_dir: Any, recipe: Any, recipe_digest: bytes | None,
                       replay: int, replay_seed: int, tolerance: float | None,
                       progress: Progress | None, model: Any, foreign: list[Any]) -> list[CheckResult]:
    """checkpoints, init, continuity, replay (each skips with its reason when it cannot run)."""
    from pathlib import Path

    if loaded.genesis is None:
        return [CheckResult(name, "skip", "no readable genesis") for name in CHECKS[4:]]
    if not isinstance(loaded.genesis.get("fingerprints"), dict):  # not written by the recorder: nothing to decode
        return [CheckResult(name, "skip", "the ledger carries no training fingerprints (not written by the recorder)",
                            summary="no training fingerprints") for name in CHECKS[4:-1]] + [
            check_independence(None, model, foreign, progress)]
    view = build(loaded, ledger.path, Path(checkpoint_dir) if checkpoint_dir is not None else None)
    here = environment(view.genesis.get("environment", {}).get("device", "cpu")) if recipe is not None or \
        view.checkpoints else {}
    checkpoints_result = check_checkpoints(view)
    results = [checkpoints_result]
    init = check_init(view, recipe, here)
    recorded_source = (view.genesis.get("recipe") or {}).get("source_sha256")
    if recipe_digest is not None and recorded_source is not None and recorded_source != recipe_digest:
        init = replace(init, detail=init.detail + "; note: the recipe file differs from the one recorded in genesis")
    results.append(init)
    continuity = check_continuity(view, load_weights=restore_weights_only if view.checkpoints else None)
    results.append(continuity)
    results.append(check_replay(view, recipe, anomalies=list(continuity.data.get("anomalies", [])),
                                movement=movement(view) if view.recorded else {}, n_random=replay, seed=replay_seed,
                                tolerance=tolerance, environment_here=here, progress=progress,
                                verified_steps=frozenset(checkpoints_result.data.get("matched", []))))
    results.append(check_independence(view, model, foreign, progress))
    return results


__all__ = ["CHECKS", "CheckResult", "Report", "build", "check_chain", "check_checkpoints", "check_continuity",
           "check_independence",
           "check_init", "check_model", "check_replay", "check_seal", "check_signatures", "load", "render_html",
           "verify_ledger"]
