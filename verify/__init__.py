"""Checking a ledger: every check is a small unit with a name and a result (docs/VERIFYING.md).

:func:`verify_ledger` loads the ledger and the inputs into one :class:`Context`, runs the checks of
:data:`CHECKS` in order — ``chain``, ``signatures``, ``seal``, ``heads``, ``model``, ``checkpoints``, ``init``,
``continuity``, ``replay``, ``independence``, ``mlflow``, ``timestamps`` — and returns a :class:`Report` that
:func:`render_text`, :func:`render_json` and :func:`render_html` show. A check whose inputs or
optional dependencies are absent is skipped by the registry with the reason. This package never
imports ``ledger.hooks``, and imports torch, scipy and matplotlib only inside the checks and
renderers that need them (and mlflow only inside :mod:`ledger.verify._mlflow`'s functions).
:func:`verify_mlflow_run` verifies the ledger an MLflow run published, and compares the run with it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import secrets
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledger import __version__
from ledger._arrow import string_codes
from ledger._crypto import PublicKey, load_public_key
from ledger._reader import Ledger
from ledger._recipe import load_recipe
from ledger._record import FORMAT_VERSION, HEADER_SIZE, Kind
from ledger.errors import ConfigurationError, FormatError
from ledger.verify._checkpoints import check_checkpoints
from ledger.verify._context import Context, Options
from ledger.verify._continuity import check_continuity
from ledger.verify._disclosure import watch_files
from ledger.verify._heads import check_heads
from ledger.verify._independence import check_independence
from ledger.verify._init import check_init
from ledger.verify._inputs import ModelDigests, require_file
from ledger.verify._integrity import check_chain, check_seal, check_signatures
from ledger.verify._lineage import Lineage, compare_files
from ledger.verify._load import Loaded, first_break, header_field
from ledger.verify._load import load as _load
from ledger.verify._model import check_model
from ledger.verify._registry import Check, Requirement, extra, given, readable_genesis, recorded, run_checks
from ledger.verify._result import CheckResult, Report, Status
from ledger.verify._run import RunView
from ledger.verify._run import build as _build
from ledger.verify._series import training_series
from ledger.verify.report import render_html, render_json, render_text

if TYPE_CHECKING:
    from ledger.verify._mlflow import MlflowSource
    from ledger.verify._replay import check_replay



def _imported_when_run(module: str, name: str) -> Callable[[Context], CheckResult]:
    """Check ``name`` of ``module``, whose module is imported only when the check runs (its imports —
    torch's replay, MLflow's client, the TSA's ASN.1 — serve no other check)."""
    def run(ctx: Context) -> CheckResult:
        result: CheckResult = getattr(importlib.import_module(module), name)(ctx)
        return result

    return run


_REPLAY = _imported_when_run("ledger.verify._replay", "check_replay")
_MLFLOW = _imported_when_run("ledger.verify._mlflow", "check_mlflow")
_TIMESTAMPS = _imported_when_run("ledger.verify._timestamps", "check_timestamps")
_TORCH = extra("torch", "torch", "regenerating the init and replaying steps")
_RECORDED = (readable_genesis(), recorded())


def _declares_base(ctx: Context) -> bool:
    """Genesis declares a fine-tuning base: ``init`` checks it without a recipe or torch."""
    return ctx.view is not None and ctx.view.genesis.base is not None


_RECIPE_OR_BASE = Requirement(lambda ctx: bool(ctx.recipe) or _declares_base(ctx),
                              "no --recipe given: the init could not be regenerated", "no --recipe given")
_TORCH_UNLESS_BASE = Requirement(lambda ctx: _declares_base(ctx) or _TORCH.met(ctx), _TORCH.reason, _TORCH.summary)

#: The checks of a verdict, in the order they run (a later check may read an earlier one's result).
CHECKS: tuple[Check, ...] = (
    Check("chain", check_chain),
    Check("signatures", check_signatures),
    Check("seal", check_seal),
    Check("heads", check_heads),
    Check("model", check_model, (given("model", "no --model given: the released weights were not compared"),)),
    Check("checkpoints", check_checkpoints, _RECORDED),
    Check("init", check_init, (*_RECORDED, _RECIPE_OR_BASE, _TORCH_UNLESS_BASE)),
    Check("continuity", check_continuity, _RECORDED),
    Check("replay", _REPLAY, (*_RECORDED, given("recipe", "no --recipe given: no interval was re-executed"), _TORCH)),
    Check("independence", check_independence,
          (given("against", "no --against given"), extra("scipy", "lineage", "the lineage tests"))),
    Check("mlflow", _MLFLOW, (readable_genesis(), given("mlflow", "no --mlflow-run given: no MLflow run was compared"),
                              extra("mlflow", "mlflow", "comparing with an MLflow run"))),
    Check("timestamps", _TIMESTAMPS,
          (readable_genesis(), given("tsa_roots", "no --tsa-roots given: timestamps were not verified (no TSA is "
                                                  "trusted by default)"),
           extra("rfc3161_client", "tsa", "verifying timestamps"))),
)
CHECK_NAMES = tuple(check.name for check in CHECKS)

Progress = Callable[[str, int, int], None]


def verify_ledger(path: str | os.PathLike[str], *, key: PublicKey | str | os.PathLike[str] | None = None,
                  model: str | os.PathLike[str] | None = None, sample: int | None = None,
                  sample_seed: int | None = None, require: Iterable[str] = (), workers: int | None = None,
                  progress: Progress | None = None, checkpoints: str | os.PathLike[str] | None = None,
                  recipe: Any = None, replay: int = 2, replay_seed: int | None = None,
                  tolerance: float | None = None, against: Iterable[str | os.PathLike[str]] = (),
                  base: str | os.PathLike[str] | None = None, mlflow: MlflowSource | None = None,
                  tsa_roots: str | os.PathLike[str] | None = None) -> Report:
    """Run every check of :data:`CHECKS` on the ledger at ``path`` and return the report. Never
    raises for a damaged ledger: that is a failed check (:meth:`Report.raise_if_failed` turns a failed
    verdict into :class:`~ledger.VerificationError`); raises :class:`~ledger.ConfigurationError` for
    inputs that cannot be used.

    ``key`` is the trainer's public key (a path or a :class:`~ledger.PublicKey`); without it the key
    embedded in genesis is used and ``signatures`` is at best a warning. ``model`` is the released
    weights (safetensors file or sharded ``*.index.json``), compared with the seal's final weights.
    ``checkpoints`` is a directory holding the checkpoints (named by state digest) when they are not
    inside the ledger. ``recipe`` (``"FILE.py:NAME"`` or a recipe object) enables ``init`` and
    ``replay``. ``against`` names foreign weight files to test lineage against (``independence``, and
    ``init``: is the recipe's init built from them?). ``base`` is the weights file of the base a
    fine-tuning run declares in genesis. The rest are :class:`Options`: ``sample=N`` checks the head
    and N random entries' signatures and bodies only (drawn with ``sample_seed``); ``require`` names
    checks that must pass (a warn or skip then fails); ``replay`` random intervals are re-executed
    besides the anomalies, the final state and the largest update, drawn with ``replay_seed`` (fresh
    randomness when None); ``tolerance`` forces the relative rule with that ρ. ``mlflow`` names the MLflow
    run the ledger was mirrored to: check ``mlflow`` compares it with the ledger. ``tsa_roots`` is a PEM
    file of the TSA root certificates trusted for check ``timestamps`` (without it the check skips).
    """
    options = Options(sample=sample, sample_seed=secrets.randbits(64) if sample_seed is None else sample_seed,
                      workers=workers, replay=replay,
                      replay_seed=secrets.randbits(63) if replay_seed is None else replay_seed,
                      tolerance=tolerance, require=tuple(require))
    ctx = load_context(path, options, key=key, model=model, checkpoints=checkpoints, recipe=recipe, against=against,
                       base=base, progress=progress, tsa_roots=tsa_roots)
    if mlflow is not None:
        ctx = dataclasses.replace(ctx, mlflow=mlflow)
    try:
        results = run_checks(ctx, CHECKS)
    finally:
        if ctx.model_digests is not None:  # unread when check model did not hash in tensor/v1
            ctx.model_digests.cancel()
    return Report(results, _facts(ctx), training_series(ctx.loaded, ctx.view)).require(options.require)


def verify_mlflow_run(run_id: str, tracking_uri: str | None = None, *, live: bool = False, **kwargs: Any) -> Report:
    """Download the ledger an MLflow run published (its ``ledger/`` artifacts) into a temporary
    directory, verify it as :func:`verify_ledger` does (same keyword arguments; ``key`` is required:
    the run's own ``key.pub`` is not evidence) and compare the run with it (check ``mlflow``; ``live``:
    the run is still going, so an unsealed published ledger warns instead of failing). Raises
    :class:`~ledger.ConfigurationError` when the server cannot be reached or the run holds no ledger."""
    if kwargs.get("key") is None:
        raise ConfigurationError("verifying from MLflow needs the trainer's public key (key=…): whoever can edit "
                                 "the run can replace its ledger and its key.pub")
    from ledger.verify._mlflow import MlflowSource, download_ledger

    source = MlflowSource(run_id, tracking_uri, live)
    with tempfile.TemporaryDirectory(prefix="ledger-mlflow-") as tmp:
        path = download_ledger(source, Path(tmp))
        report = verify_ledger(path, mlflow=source, **kwargs)
    facts = {**report.ledger, "path": f"mlflow:{run_id}/ledger", "mlflow_run": run_id}
    if tracking_uri:
        facts["tracking_uri"] = tracking_uri
    return dataclasses.replace(report, ledger=facts)


def load_context(path: str | os.PathLike[str], options: Options | None = None, *,
                 key: PublicKey | str | os.PathLike[str] | None = None, model: str | os.PathLike[str] | None = None,
                 checkpoints: str | os.PathLike[str] | None = None, recipe: Any = None,
                 against: Iterable[str | os.PathLike[str]] = (), base: str | os.PathLike[str] | None = None,
                 progress: Progress | None = None, tsa_roots: str | os.PathLike[str] | None = None) -> Context:
    """Check the inputs (as :func:`verify_ledger` takes them), read the ledger and recompute every
    entry hash: the :class:`Context` the checks run on. The files the recipe opens while it is
    imported are recorded for ``init`` (disclosure, not proof). Without torch installed the recipe is
    not imported: ``init`` and ``replay`` are then skipped with the line that installs it."""
    options = options or Options()
    unknown = sorted(set(options.require) - set(CHECK_NAMES))
    if unknown:
        raise ConfigurationError(f"unknown check name(s) for --require: {', '.join(unknown)} "
                                 f"(known: {', '.join(CHECK_NAMES)})")
    public = load_public_key(key) if key is not None and not isinstance(key, PublicKey) else key
    for what, file in (("weights file", model), ("--base file", base), *(("--against file", f) for f in against)):
        if file is not None:
            require_file(file, what)
    trusted_tsa: tuple[Any, ...] = ()
    if tsa_roots is not None:
        from ledger._tsa import load_roots

        trusted_tsa = load_roots(tsa_roots)
    if checkpoints is not None and not os.path.isdir(checkpoints):
        raise ConfigurationError(f"checkpoint directory {checkpoints} does not exist")
    recipe_digest = None
    recipe_files: tuple[str, ...] = ()
    if isinstance(recipe, str) and importlib.util.find_spec("torch") is not None:
        with watch_files(ignore=[recipe.rpartition(":")[0]]) as watch:
            recipe, recipe_digest = load_recipe(recipe)
        recipe_files = watch.files
    # the weights hash on every core while the ledger is read and checked (after the recipe's import,
    # whose file opens are watched): check ``model`` takes the digests
    prefetch = ModelDigests(model) if model is not None else None
    try:
        ledger = Ledger(path)
        loaded = _load(ledger)
        _refuse_newer_format(ledger, loaded)
        view, view_error = None, None
        if loaded.genesis is not None:
            try:  # entries past the first broken link are not decoded: the chain has failed already
                view = _build(loaded, ledger.path, Path(checkpoints) if checkpoints is not None else None,
                              limit=first_break(loaded))
            except FormatError as exc:  # a genesis that breaks the schema: the provenance checks fail with this
                view_error = str(exc)
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
                view_error = f"{type(exc).__name__}: {exc}"  # a schema gap let a crafted genesis through
            except MemoryError:  # the decoded bodies do not fit under a memory limit: the provenance checks fail
                view_error = "the entries' bodies could not be decoded: they do not fit in memory"
    except BaseException:
        if prefetch is not None:
            prefetch.cancel()
        raise
    return Context(ledger=ledger, loaded=loaded, view=view, view_error=view_error, options=options, key=public,
                   model=Path(model) if model is not None else None,
                   checkpoints=Path(checkpoints) if checkpoints is not None else None, recipe=recipe,
                   recipe_digest=recipe_digest, against=tuple(Path(f) for f in against),
                   base=Path(base) if base is not None else None, recipe_files=recipe_files, progress=progress,
                   rng=random.Random(options.sample_seed), tsa_roots=trusted_tsa,
                   model_digests=prefetch)


def _refuse_newer_format(ledger: Ledger, loaded: Loaded) -> None:
    """A ledger in a newer format than this verifier knows cannot be judged here (docs/FORMAT.md §9):
    when every record — in the parts and in the log — says the same newer version. A version field
    damaged in some records is a broken chain, judged by ``chain`` at that seq. The log's versions
    are those the reader saw as it scanned it (a damaged log has none: the chain check reports it)."""
    headers, lengths = loaded.headers()  # from the Arrow buffers: no record is copied
    stated = header_field(headers, "version")[lengths >= HEADER_SIZE]
    versions = set(stated[stated != stated[0]].tolist()) | {int(stated[0])} if len(stated) else set()
    versions |= ledger.wal_versions
    if len(versions) == 1 and (version := versions.pop()) > FORMAT_VERSION:
        raise ConfigurationError(f"{ledger.path} is in format version {version}; this verifier (training-ledger "
                                 f"{__version__}) knows version {FORMAT_VERSION}: upgrade training-ledger")


def _facts(ctx: Context) -> dict[str, Any]:
    loaded, genesis = ctx.loaded, ctx.loaded.genesis or {}
    kinds = loaded.table["kind"]
    last_kind = kinds[-1].as_py() if len(kinds) else None
    facts: dict[str, Any] = {
        "path": str(ctx.ledger.path),
        "run_id": genesis.get("run_id"),
        "entries": len(loaded.records),
        "steps": int((string_codes(kinds, [Kind.STEP.label]) == 0).sum()),
        "sealed": last_kind == Kind.SEAL.label,
        "head": loaded.hashes[-1].hex() if loaded.hashes else None,
        "key_id": genesis["key_id"].hex() if isinstance(genesis.get("key_id"), bytes) else None,
        "torn_tail_bytes": len(ctx.ledger.wal_torn),
    }
    if ctx.options.sample is not None:
        facts["sample"] = {"size": ctx.options.sample, "seed": ctx.options.sample_seed}
    return facts


__all__ = ["CHECKS", "Check", "CheckResult", "Context", "Lineage", "Options", "Report", "Requirement", "RunView",
           "Status", "check_chain", "check_checkpoints", "check_continuity", "check_independence", "check_init",
           "check_model", "check_replay", "check_seal", "check_signatures", "compare_files", "load_context",
           "render_html", "render_json", "render_text", "run_checks", "verify_ledger", "verify_mlflow_run"]


# Names that were public here before 0.2; they keep working one release, with a warning.
_MOVED = {"load": "ledger.verify._load", "build": "ledger.verify._run"}
_LAZY = {"check_replay": "ledger.verify._replay"}  # imported on first use


def __getattr__(name: str) -> Any:
    """``check_replay`` (imported on first use); old names (``ledger.verify.load``, ``build``), with a
    ``DeprecationWarning``."""
    if name in _LAZY:
        value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
        return value
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module 'ledger.verify' has no attribute {name!r}")
    warnings.warn(f"ledger.verify.{name} is internal now ({where}.{name}); use load_context", DeprecationWarning,
                  stacklevel=2)
    return getattr(importlib.import_module(where), name)
