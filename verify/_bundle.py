"""``ledger verify DIR`` on a release bundle (docs/PUBLISHING.md): its own checks, then the usual ones.

The bundle checks — ``bundle`` (layout: regular files and directories only, nothing that leads out
of DIR), ``attestations`` (DSSE signatures by accepted keys, statement structure), ``subjects``
(every model file named with its SHA-256, nothing else), ``release`` (the predicate's facts equal
what the bundle's ledger says), ``oms`` (``model.sig`` with ``model_signing``'s verifier) — come
first in the report; then every check of :data:`ledger.verify.CHECKS` runs on ``DIR/ledger`` with
``--model DIR/model``. Reading a bundle writes nothing and opens only paths found by walking DIR
without following links; names in the attestations or an index are compared, never opened.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger._crypto import PublicKey, ReleaseKey, load_release_key, release_key_from_pem
from ledger._io import KiB, file_kind, read_regular
from ledger._policy import Policy, load_policy
from ledger.errors import ConfigurationError, FormatError
from ledger.verify._result import CheckResult, Report, Status

ATTESTATIONS = "attestations.intoto.jsonl"
MAX_BUNDLE_ENTRIES = 200_000
BUNDLE_CHECKS = ("bundle", "attestations", "subjects", "release", "oms")
SHIPPED_KEYS = ("release.pub", "ledger/key.pub")
ENTRY_FILES = ("model/model.safetensors.index.json", "model/model.safetensors")


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory laid out as a release bundle (attestations and ledger/)."""
    root = Path(path)
    return root.is_dir() and os.path.lexists(root / ATTESTATIONS) and os.path.lexists(root / "ledger")


@dataclass(frozen=True, slots=True)
class Scan:
    """The bundle as found: regular files (relative POSIX path → size) and what is wrong."""

    files: dict[str, int]
    problems: list[str]


def scan(root: Path) -> Scan:
    """Walk ``root`` without following links: symlinks and special files are problems, as is a
    bundle of more than MAX_BUNDLE_ENTRIES entries or one missing model/, ledger/ or the attestations."""
    files: dict[str, int] = {}
    problems: list[str] = []
    stack, count = [(root, "")], 0
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as listing:
            for item in listing:
                count += 1
                if count > MAX_BUNDLE_ENTRIES:
                    return Scan(files, [*problems, f"more than {MAX_BUNDLE_ENTRIES} files"])
                rel = prefix + item.name
                info = item.stat(follow_symlinks=False)
                if item.is_symlink():
                    problems.append(f"{rel!r} is a symlink")
                elif item.is_dir(follow_symlinks=False):
                    stack.append((Path(item.path), rel + "/"))
                elif item.is_file(follow_symlinks=False):
                    files[rel] = info.st_size
                else:
                    problems.append(f"{rel!r} is {file_kind(info.st_mode)}")
    dirs = _dirs(files)
    problems += [f"{need.rstrip('/')} is missing" for need in (ATTESTATIONS, "ledger/", "model/")
                 if need not in files and need not in dirs]
    return Scan(files, sorted(problems))


@dataclass(slots=True)
class Trust:
    """What the verifier trusts: accepted keys by hex id (with the PEM file each came from, for
    ``model_signing``), the policy, the trainer's key for the ledger checks, and whether any trust
    input was given at all (without one, the bundle's own keys make it self-consistent only)."""

    keys: dict[str, ReleaseKey] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    policy: Policy | None = None
    trainer: PublicKey | None = None
    given: bool = False
    release_given: bool = False  # a release key or a policy was given (not just the trainer's --key)
    shipped: dict[str, tuple[ReleaseKey, Path]] = field(default_factory=dict)  # keys in the bundle, by id


def _shipped(root: Path, scanned: Scan) -> dict[str, tuple[ReleaseKey, Path]]:
    out = {}
    for name in SHIPPED_KEYS:
        if name in scanned.files:
            try:
                key = release_key_from_pem(read_regular(root / name, what="key file", limit=64 * KiB), name)
            except (ConfigurationError, FormatError):
                continue  # a damaged shipped key: the checks that need it say so
            out[key.key_id.hex()] = (key, root / name)
    return out


def trust_for(root: Path, scanned: Scan, key: str | os.PathLike[str] | PublicKey | None,
              release_key: str | os.PathLike[str] | None, policy: str | os.PathLike[str] | Policy | None,
              genesis_key_id: bytes | None) -> Trust:
    """Gather the trust inputs: ``key`` (the trainer's Ed25519 key), ``release_key`` (PEM),
    ``policy`` (a file or a :class:`Policy`); keys shipped in the bundle count only when the policy
    lists their id."""
    trust = Trust(given=any(x is not None for x in (key, release_key, policy)),
                  release_given=release_key is not None or policy is not None, shipped=_shipped(root, scanned))
    if isinstance(key, PublicKey):
        trust.trainer = key
    elif key is not None:
        from ledger._crypto import load_public_key

        trust.trainer = load_public_key(key)
        loaded = load_release_key(key)
        trust.keys[loaded.key_id.hex()], trust.paths[loaded.key_id.hex()] = loaded, Path(key)
    if release_key is not None:
        loaded = load_release_key(release_key)
        trust.keys[loaded.key_id.hex()], trust.paths[loaded.key_id.hex()] = loaded, Path(release_key)
    if policy is not None:
        trust.policy = policy if isinstance(policy, Policy) else load_policy(policy)
        for accepted, path in trust.policy.keys:
            trust.keys[accepted.key_id.hex()], trust.paths[accepted.key_id.hex()] = accepted, path
        for ident, (shipped, path) in trust.shipped.items():
            if ident in trust.policy.key_ids:
                trust.keys[ident], trust.paths[ident] = shipped, path
    if trust.trainer is None and genesis_key_id is not None:
        match = trust.keys.get(genesis_key_id.hex())
        if match is not None and match.algorithm == "ed25519":
            trust.trainer = PublicKey(match.der[-32:])
    return trust


def _genesis_key_id(ledger_dir: Path) -> bytes | None:
    from ledger._reader import Ledger

    try:
        value = Ledger(ledger_dir).genesis().get("key_id")
    except Exception:  # noqa: BLE001 - a damaged ledger is the chain check's to report
        return None
    return value if isinstance(value, bytes) else None


def verify_bundle(path: str | os.PathLike[str], *, key: str | os.PathLike[str] | PublicKey | None = None,
                  release_key: str | os.PathLike[str] | None = None, policy: str | os.PathLike[str] | Policy | None
                  = None, require: Iterable[str] = (), model: Any = None, **kwargs: Any) -> Report:
    """Verify the release bundle at ``path``: the bundle checks, then :func:`~ledger.verify.verify_ledger`
    on its ledger and weights (``kwargs`` as there). Trust: ``key`` (trainer), ``release_key``,
    ``policy``; with none, a passing verdict means "self-consistent, signer not authenticated"."""
    from ledger.verify import CHECK_NAMES, verify_ledger
    from ledger.verify._bundle_checks import run_bundle_checks

    if model is not None:
        raise ConfigurationError("--model is not given with a bundle: its weights are DIR/model")
    root = Path(path)
    wanted = list(require)
    unknown = sorted(set(wanted) - set(CHECK_NAMES) - set(BUNDLE_CHECKS))
    if unknown:
        raise ConfigurationError(f"unknown check name(s) for --require: {', '.join(unknown)}")
    scanned = scan(root)
    if scanned.problems:
        shown = "; ".join(scanned.problems[:5]) + (" …" if len(scanned.problems) > 5 else "")
        checks = [CheckResult("bundle", Status.FAIL, f"not read further: {shown}",
                              {"problems": scanned.problems[:100]})]
        checks += [CheckResult(n, Status.SKIP, "the bundle's layout failed: nothing in it was read",
                               summary="bundle layout failed") for n in (*BUNDLE_CHECKS[1:], *CHECK_NAMES)]
        return Report(tuple(checks), {"path": str(root), "bundle": True})
    trust = trust_for(root, scanned, key, release_key, policy, _genesis_key_id(root / "ledger"))
    entry = next((name for name in ENTRY_FILES if name in scanned.files), None)
    bundle_results = run_bundle_checks(root, scanned, trust, entry)
    if entry is None:
        checks = [*bundle_results, *(CheckResult(n, Status.SKIP, "no weights in model/", summary="no weights")
                                     for n in CHECK_NAMES)]
        return Report(tuple(checks), {"path": str(root), "bundle": True}).require(wanted)
    checkpoints = kwargs.pop("checkpoints", None)
    if checkpoints is None and "ledger/checkpoints/" in _dirs(scanned.files):
        checkpoints = root / "ledger" / "checkpoints"
    report = verify_ledger(root / "ledger", key=trust.trainer, model=root / entry, checkpoints=checkpoints,
                           require=[n for n in wanted if n in CHECK_NAMES], **kwargs)
    facts = {**report.ledger, "path": str(root), "bundle": True, "ledger_path": str(root / "ledger")}
    combined = dataclasses.replace(report, checks=(*bundle_results, *report.checks), ledger=facts)
    return combined.require([n for n in wanted if n in BUNDLE_CHECKS])


def _dirs(files: Iterable[str]) -> set[str]:
    """Every directory (``a/``, ``a/b/``) that holds a file of ``files``."""
    out: set[str] = set()
    for name in files:
        parts = name.split("/")
        out.update("/".join(parts[:i]) + "/" for i in range(1, len(parts)))
    return out


__all__ = ["ATTESTATIONS", "BUNDLE_CHECKS", "Scan", "Trust", "is_bundle", "scan", "trust_for", "verify_bundle"]
