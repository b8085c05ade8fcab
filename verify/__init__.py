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

import pyarrow.compute as pc
from ledger.verify._integrity import check_chain, check_seal, check_signatures, load
from ledger.verify._model import check_model
from ledger.verify._result import CheckResult, Report

from ledger._crypto import PublicKey, load_public_key
from ledger._reader import Ledger
from ledger._record import Kind
from ledger.errors import ConfigurationError

CHECKS = ("chain", "signatures", "seal", "model")

Progress = Callable[[str, int, int], None]


def verify_ledger(path: str | os.PathLike[str], *, key: PublicKey | str | os.PathLike[str] | None = None,
                  model: str | os.PathLike[str] | None = None, sample: int | None = None,
                  sample_seed: int | None = None, require: Iterable[str] = (), workers: int | None = None,
                  progress: Progress | None = None) -> Report:
    """Run every check on the ledger at ``path`` and return the report (never raises for a
    damaged ledger: that is a failed check). ``key`` is the trainer's public key (a path or a
    :class:`~ledger.PublicKey`); without it the key embedded in genesis is used and
    ``signatures`` is at best a warning. ``sample=N`` checks the head and N random entries'
    signatures and bodies only. ``model`` is the released weights (safetensors file or sharded
    ``*.index.json``), compared with the seal's final weights. ``require`` names checks that must
    pass (a warn or skip then fails).
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


__all__ = ["CHECKS", "CheckResult", "Report", "verify_ledger"]
