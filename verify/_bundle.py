"""``ledger verify DIR`` on a release bundle (docs/PUBLISHING.md): its own checks, then the usual ones.

The bundle checks — ``bundle`` (layout: regular files and directories only, nothing that leads out
of DIR, one weights entry in ``model/`` and no other weight file; a warning for files no check
covers), ``attestations`` (DSSE signatures by accepted keys, statement structure), ``subjects``
(every model file named with its SHA-256, nothing else), ``release`` (the predicate's facts equal
what the bundle's ledger says), ``oms`` (``model.sig`` with ``model_signing``'s verifier) — come
first in the report; then every check of :data:`ledger.verify.CHECKS` runs on ``DIR/ledger`` with
``--model DIR/model/<entry>``, checkpoints read only from ``DIR/ledger/checkpoints``. Reading a
bundle writes nothing and opens only paths found by walking DIR without following links; names in
the attestations, an index or the ledger's entries are compared, never opened outside DIR.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger._crypto import PublicKey, ReleaseKey, release_key_from_pem
from ledger._io import KiB, file_kind, read_regular
from ledger._policy import Policy, Trust, trust_for
from ledger.errors import ConfigurationError, FormatError
from ledger.verify._result import CheckResult, Report, Status

ATTESTATIONS = "attestations.intoto.jsonl"
MAX_BUNDLE_ENTRIES = 200_000
MAX_DEPTH = 32  # directories below DIR (a bundle has at most 4: ledger/checkpoints/<digest>/…)
BUNDLE_CHECKS = ("bundle", "attestations", "subjects", "release", "oms")
SHIPPED_KEYS = ("release.pub", "ledger/key.pub")
ENTRY_FILES = ("model/model.safetensors.index.json", "model/model.safetensors")
#: Suffixes of files a model loader may read as weights (lower case): in model/ only the entry and
#: the shards its index names may carry one.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".ggml", ".onnx",
                   ".tflite", ".keras", ".npz", ".npy", ".pkl", ".pickle", ".joblib", ".mlmodel", ".ot",
                   ".index.json")
#: What git and ``huggingface-cli download --local-dir`` add to a downloaded repository: not warned about.
DOWNLOAD_METADATA = (".gitattributes", ".cache/huggingface/")
_HEAD_FILE = re.compile(r"^ledger/heads/(0|[1-9][0-9]{0,19})\.(note|tsr)$")
_PART_FILE = re.compile(r"^ledger/parts/[0-9]{6}\.parquet$")
_STATE_FILES = ("model.safetensors", "optimizer.safetensors", "state.cbor")


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
    """Walk ``root`` without following links: symlinks, special files, unreadable directories and
    names, directories nested more than MAX_DEPTH deep and more than MAX_BUNDLE_ENTRIES entries are
    problems, as is a missing model/, ledger/ or attestations file."""
    files: dict[str, int] = {}
    problems: list[str] = []
    stack, count = [(root, "", 0)], 0
    while stack:
        directory, prefix, depth = stack.pop()
        try:
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
                        if depth + 1 > MAX_DEPTH:
                            problems.append(f"{rel[:120]!r}… nests more than {MAX_DEPTH} directories deep")
                        else:
                            stack.append((Path(item.path), rel + "/", depth + 1))
                    elif item.is_file(follow_symlinks=False):
                        files[rel] = info.st_size
                    else:
                        problems.append(f"{rel!r} is {file_kind(info.st_mode)}")
        except OSError as exc:  # a name too long to open, a directory without read permission …
            problems.append(f"{(prefix or './')[:120]!r} cannot be read: {exc.strerror or type(exc).__name__}")
    dirs = _dirs(files)
    problems += [f"{need.rstrip('/')} is missing" for need in (ATTESTATIONS, "ledger/", "model/")
                 if need not in files and need not in dirs]
    return Scan(files, sorted(problems))


def weights_entry(root: Path, scanned: Scan) -> tuple[str | None, list[str]]:
    """The weights entry of ``model/`` (``model.safetensors`` or ``model.safetensors.index.json``) and
    the problems that leave it undecided: neither or both present, an unreadable index, or a weight
    file (:data:`WEIGHT_SUFFIXES`) that is neither the entry nor a shard its index names — a loader
    could read that one instead of the weights the checks compare."""
    from ledger._fingerprint import _shard_files

    present = [name for name in ENTRY_FILES if name in scanned.files]
    if not present:
        return None, ["model/ holds neither model.safetensors nor model.safetensors.index.json"]
    if len(present) > 1:
        return None, ["model/ holds both model.safetensors and model.safetensors.index.json: a loader reads one, "
                      "and which one is not the bundle's to decide"]
    entry, allowed = present[0], set(present)
    if entry.endswith(".index.json"):
        try:
            allowed |= {f"model/{shard.name}" for shard in _shard_files(root / entry)}
        except (ConfigurationError, FormatError, OSError, ValueError, RecursionError) as exc:
            return None, [f"{entry} is not a readable index: {' '.join(str(exc).split())[:200]}"]
    others = sorted(name for name in scanned.files if name.startswith("model/") and name not in allowed
                    and name.lower().endswith(WEIGHT_SUFFIXES))
    if others:
        shown = ", ".join(repr(n) for n in others[:5]) + (" …" if len(others) > 5 else "")
        return None, [f"model/ holds weight file(s) that are neither {entry} nor a shard it names: {shown}"]
    return entry, []


def uncovered(scanned: Scan, state_digests: Iterable[str], dcp_names: Iterable[str], card: bool) -> list[str]:
    """The files of the bundle whose content no check reads or compares (``card``: LEDGER.md is the
    card ``publish`` writes for the attested facts). Download metadata is left out."""
    digests, dcp = set(state_digests), tuple(f"ledger/checkpoints/{n}/" for n in dcp_names)
    top = {ATTESTATIONS, "model.sig", *SHIPPED_KEYS, "ledger/wal.log", *(["LEDGER.md"] if card else [])}
    out = []
    for name in sorted(scanned.files):
        parts = name.split("/")
        if name in top or name.startswith("model/") or _HEAD_FILE.match(name) or _PART_FILE.match(name) \
                or name.startswith(dcp) or name.startswith(DOWNLOAD_METADATA):
            continue
        if len(parts) == 4 and parts[:2] == ["ledger", "checkpoints"] and parts[2] in digests \
                and parts[3] in _STATE_FILES:
            continue
        out.append(name)
    return out


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
    """Verify the release bundle at ``path``: the bundle checks, then the checks of
    :func:`~ledger.verify.verify_ledger` on its ledger and weights (``kwargs`` as there; checkpoints
    only from ``DIR/ledger/checkpoints``, or the directory ``checkpoints`` names). Trust: ``key``
    (trainer), ``release_key``, ``policy`` — none may lie inside ``path`` (ConfigurationError); with
    none, a passing verdict means "self-consistent, signer not authenticated"."""
    from ledger.verify import CHECK_NAMES
    from ledger.verify._bundle_checks import run_bundle_checks

    if model is not None:
        raise ConfigurationError("--model is not given with a bundle: its weights are DIR/model")
    root = Path(path)
    wanted = list(require)
    unknown = sorted(set(wanted) - set(CHECK_NAMES) - set(BUNDLE_CHECKS))
    if unknown:
        raise ConfigurationError(f"unknown check name(s) for --require: {', '.join(unknown)}")
    checkpoints = kwargs.pop("checkpoints", None)
    if checkpoints is not None and not os.path.isdir(checkpoints):
        raise ConfigurationError(f"checkpoint directory {checkpoints} does not exist")
    scanned = scan(root)
    if scanned.problems:
        shown = "; ".join(scanned.problems[:5]) + (" …" if len(scanned.problems) > 5 else "")
        checks = [CheckResult("bundle", Status.FAIL, f"not read further: {shown}",
                              {"problems": scanned.problems[:100]})]
        checks += [CheckResult(n, Status.SKIP, "the bundle's layout failed: nothing in it was read",
                               summary="bundle layout failed") for n in (*BUNDLE_CHECKS[1:], *CHECK_NAMES)]
        return Report(tuple(checks), {"path": str(root), "bundle": True})
    trust = trust_for(root, _shipped(root, scanned), key, release_key, policy, _genesis_key_id(root / "ledger"))
    entry, why = weights_entry(root, scanned)
    state: dict[str, Any] = {}
    bundle_results = run_bundle_checks(root, scanned, trust, entry, why, state)
    base = Path(checkpoints) if checkpoints is not None else root / "ledger" / "checkpoints"
    report, digests, dcp = _verify_ledger_confined(root / "ledger", base, root / entry if entry else None,
                                                   trust.trainer, wanted, kwargs)
    if entry is None:  # the weights a loader would read are not decided: none is compared with the seal
        report = dataclasses.replace(report, checks=tuple(
            CheckResult("model", Status.SKIP, f"no single weights entry in model/: {why[0]}",
                        summary="no single weights entry") if c.name == "model" else c for c in report.checks))
    left = uncovered(scanned, digests, dcp, bool(state.get("card")))
    if left and bundle_results[0].status is Status.PASS:
        shown = ", ".join(repr(n) for n in left[:5]) + (" …" if len(left) > 5 else "")
        bundle_results[0] = CheckResult("bundle", Status.WARN, f"{bundle_results[0].detail}; {len(left)} file(s) no "
                                        f"check covers (their content is not verified): {shown}",
                                        {**bundle_results[0].data, "uncovered": left[:100]},
                                        summary=f"{len(left)} file(s) no check covers")
    facts = {**report.ledger, "path": str(root), "bundle": True, "ledger_path": str(root / "ledger")}
    combined = dataclasses.replace(report, checks=(*bundle_results, *report.checks), ledger=facts)
    return combined.require(wanted)


def _verify_ledger_confined(ledger_dir: Path, base: Path, model: Path | None, key: PublicKey | None, wanted: list[str],
                            kwargs: dict[str, Any]) -> tuple[Report, set[str], set[str]]:
    """:func:`~ledger.verify.verify_ledger` on a bundle's ledger, every checkpoint directory moved under
    ``base`` (``<state digest>`` or, for other tools' checkpoints, the recorded directory's name)
    before any check runs: a genesis ``checkpoint_dir`` or an entry's path never leads out of the
    bundle. A missing ``base`` makes the checkpoints missing. Also returns the state digests and
    the checkpoint directory names the ledger names (for :func:`uncovered`)."""
    from ledger.verify import CHECK_NAMES, CHECKS, Options, _facts, load_context, run_checks
    from ledger.verify._series import training_series

    def pick(name: str, default: Any = None) -> Any:
        return kwargs.pop(name, default)

    sample_seed, replay_seed, mlflow = pick("sample_seed"), pick("replay_seed"), pick("mlflow")
    options = Options(sample=pick("sample"), sample_seed=secrets.randbits(64) if sample_seed is None else sample_seed,
                      workers=pick("workers"), replay=pick("replay", 2),
                      replay_seed=secrets.randbits(63) if replay_seed is None else replay_seed,
                      tolerance=pick("tolerance"), require=tuple(n for n in wanted if n in CHECK_NAMES))
    ctx = load_context(ledger_dir, options, key=key, model=model, checkpoints=base if base.is_dir() else None,
                       **kwargs)
    if mlflow is not None:
        ctx = dataclasses.replace(ctx, mlflow=mlflow)
    digests: set[str] = set()
    names: set[str] = set()
    if ctx.view is not None:
        view = ctx.view
        view.checkpoints = [dataclasses.replace(cp, directory=base / cp.body.state_digest.hex())
                            for cp in view.checkpoints]
        names = {_plain(cp.body.path) for cp in view.dcp}
        view.dcp = [dataclasses.replace(cp, directory=base / _plain(cp.body.path)) for cp in view.dcp]
        digests = {cp.body.state_digest.hex() for cp in view.checkpoints}
    ctx = dataclasses.replace(ctx, checkpoints=base)
    report = Report(run_checks(ctx, CHECKS), _facts(ctx), training_series(ctx.loaded, ctx.view))
    return report.require(options.require), digests, names


def _plain(recorded: str) -> str:
    """The last name of a recorded checkpoint path, or ``-`` when that is no plain name (``..``, empty)."""
    name = Path(recorded).name
    return name if name not in ("", ".", "..") else "-"


def _dirs(files: Iterable[str]) -> set[str]:
    """Every directory (``a/``, ``a/b/``) that holds a file of ``files``."""
    out: set[str] = set()
    for name in files:
        parts = name.split("/")
        out.update("/".join(parts[:i]) + "/" for i in range(1, len(parts)))
    return out


__all__ = ["ATTESTATIONS", "BUNDLE_CHECKS", "ENTRY_FILES", "WEIGHT_SUFFIXES", "Scan", "Trust", "is_bundle", "scan",
           "uncovered", "verify_bundle", "weights_entry"]
