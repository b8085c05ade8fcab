"""The checks of a release bundle: ``attestations``, ``subjects``, ``release`` and ``oms``.

Each reads only files that :func:`ledger.verify._bundle.scan` found (regular files, inside DIR)
and returns a :class:`CheckResult`; a damaged input is a failed check, never an exception. Files
are hashed only once their names are the attested ones (an unnamed file fails by name, unread).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ledger import _oms
from ledger._attest import LEDGER_PREDICATE, SLSA_PREDICATE, Opened, jsonable, open_envelope, provenance
from ledger._crypto import ReleaseKey, release_key_from_pem
from ledger._io import MiB, open_regular, read_regular
from ledger._policy import Trust
from ledger._publish_card import model_card
from ledger._publish_facts import heads_of, ledger_facts, ledger_predicate
from ledger.errors import ConfigurationError, FormatError
from ledger.verify._bundle import ATTESTATIONS, Scan
from ledger.verify._result import CheckResult, Status

MAX_ATTESTATIONS_BYTES = 64 * MiB
MAX_ENVELOPES = 16
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SHORT = {LEDGER_PREDICATE: "ledger attestation", SLSA_PREDICATE: "SLSA provenance"}
State = dict[str, Any]


def _attestations(root: Path, scanned: Scan, trust: Trust, entry: str | None, state: State) -> CheckResult:
    data = read_regular(root / ATTESTATIONS, what="attestations file", limit=MAX_ATTESTATIONS_BYTES)
    lines = [line for line in data.split(b"\n") if line.strip()]
    if not 0 < len(lines) <= MAX_ENVELOPES:
        return CheckResult("attestations", Status.FAIL, f"{ATTESTATIONS} holds {len(lines)} envelopes, not 1 to "
                           f"{MAX_ENVELOPES}")
    shipped = {ident: key for ident, (key, _) in trust.shipped.items()}
    need = trust.policy.min_signatures if trust.policy is not None else 1
    opened: dict[str, Opened] = {}
    problems: list[str] = []
    self_signed = False
    for number, line in enumerate(lines, 1):
        try:
            envelope = open_envelope(line, trust.keys)
            if len(envelope.verified) < need and not trust.release_given:
                envelope, self_signed = open_envelope(line, {**shipped, **trust.keys}), True
        except FormatError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        kind = envelope.statement.get("predicateType")
        if not isinstance(kind, str) or kind not in _SHORT:
            continue  # someone else's statement: not ours to judge
        name = _SHORT[kind]
        if kind in opened:
            problems.append(f"line {number}: a second {name}")
        problems += [f"{name}: the signature by key {k[:16]}… does not verify" for k in envelope.bad]
        if len(envelope.verified) < need:
            problems.append(f"{name}: {len(envelope.verified)} valid signature(s) by accepted keys, {need} needed")
        problems += [f"{name}: {p}" for p in _subject_shape(envelope.statement)]
        opened[kind] = envelope
    problems += [f"no {name} in {ATTESTATIONS}" for kind, name in _SHORT.items() if kind not in opened]
    state["statements"] = {kind: e.statement for kind, e in opened.items()}
    state["signers"] = {k for e in opened.values() for k in e.verified}
    signers = ", ".join(sorted(k[:16] + "…" for k in state["signers"]))
    facts = {"signed_by": sorted(state["signers"]), "envelopes": len(lines)}
    if problems:
        return CheckResult("attestations", Status.FAIL, "; ".join(problems[:6]), facts)
    if self_signed or not trust.given:
        return CheckResult("attestations", Status.WARN, "self-consistent, signer not authenticated: both attestations "
                           f"verify with the bundle's own release key (key id {signers}); pass --release-key or "
                           "--policy with the publisher's key", facts, summary="self-consistent, signer not "
                           "authenticated: no --release-key or --policy given")
    return CheckResult("attestations", Status.PASS, f"the ledger attestation and the SLSA provenance are signed by "
                       f"accepted key(s) {signers}", facts)


def _subject_shape(statement: dict[str, Any]) -> list[str]:
    for item in statement["subject"]:
        digest = item.get("digest") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(digest, dict) \
                or not isinstance(digest.get("sha256"), str) or not _HEX64.match(digest["sha256"]):
            return ["a subject without a name and a SHA-256 digest"]
    return []


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path, what="model file") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _subjects(root: Path, scanned: Scan, trust: Trust, entry: str | None, state: State) -> CheckResult:
    statements = state.get("statements") or {}
    if not statements:
        return CheckResult("subjects", Status.SKIP, "no readable attestation names the files", summary="no attestation")
    files = sorted(name for name in scanned.files if name.startswith("model/"))
    problems: list[str] = []
    attested: dict[str, dict[str, str]] = {}
    for kind, statement in sorted(statements.items()):
        named = attested.setdefault(kind, {})
        for item in statement["subject"]:
            if item["name"] in named:
                problems.append(f"{_SHORT[kind]} names {item['name']!r} twice")
            named[item["name"]] = item["digest"]["sha256"]
        problems += [f"{_SHORT[kind]} names {n!r}, which is not a file in model/"
                     for n in sorted(set(named) - set(files))]
        problems += [f"{n} is not named by the {_SHORT[kind]}" for n in sorted(set(files) - set(named))]
    if problems:  # decided by the names: nothing is hashed (an unnamed file may be large)
        state["names_differ"] = True
        return CheckResult("subjects", Status.FAIL, "; ".join(dict.fromkeys(problems[:8])), {"files": len(files)})
    actual = {name: _sha256(root / name) for name in files}
    for named in attested.values():
        problems += [f"{n}: SHA-256 {actual[n][:16]}… is not the attested {named[n][:16]}…"
                     for n in files if actual[n] != named[n]]
    state["subjects"] = actual
    data = {"files": len(actual)}
    if problems:
        return CheckResult("subjects", Status.FAIL, "; ".join(dict.fromkeys(problems[:8])), data)
    return CheckResult("subjects", Status.PASS, f"all {len(actual)} files in model/ have the attested SHA-256 and "
                       "no other file is named", data)


def _differences(expected: Any, found: Any, path: str = "") -> list[str]:
    """Where two JSON values differ (dotted paths, at most a few)."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out: list[str] = []
        for key in sorted(set(expected) | set(found)):
            out += _differences(expected.get(key), found.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if expected == found else [path or "(whole)"]


def _pem_key(pem: Any) -> ReleaseKey | None:
    """The PEM public key given as text, or None when it is not one."""
    if not isinstance(pem, str) or len(pem) > 16 << 10:
        return None
    try:
        return release_key_from_pem(pem.encode("ascii", "replace"), "the attested release key")
    except ConfigurationError:
        return None


def _release(root: Path, scanned: Scan, trust: Trust, entry: str | None, state: State) -> CheckResult:
    statements = state.get("statements") or {}
    if LEDGER_PREDICATE not in statements:
        return CheckResult("release", Status.SKIP, "no readable ledger attestation", summary="no attestation")
    claimed = statements[LEDGER_PREDICATE]["predicate"]
    facts = ledger_facts(root / "ledger", entry=entry or "")
    release = claimed.get("keys", {}).get("release") if isinstance(claimed.get("keys"), dict) else None
    facts["keys"]["release"] = release
    heads, stamps = heads_of(root / "ledger", facts)
    problems = [f"the ledger attestation's {p} differs from the bundle's ledger"
                for p in _differences(ledger_predicate(facts, heads, stamps), claimed)][:6]
    pem_key = _pem_key(release.get("publicKeyPem")) if isinstance(release, dict) else None
    if not isinstance(release, dict) or release.get("keyId") not in state.get("signers", set()):
        problems.append("the release key the attestation names did not sign it")
    elif pem_key is None or pem_key.key_id.hex() != release.get("keyId"):
        problems.append("the attestation's release publicKeyPem is not the key of its keyId")
    elif release.get("algorithm") != pem_key.algorithm:
        problems.append(f"the attestation's release algorithm {str(release.get('algorithm'))[:20]!r} is not that of "
                        f"its publicKeyPem ({pem_key.algorithm})")
    slsa = statements.get(SLSA_PREDICATE)
    if slsa is not None:
        version = slsa["predicate"].get("runDetails", {}).get("builder", {}).get("version", {})
        facts["version"] = version.get("training-ledger", "") if isinstance(version, dict) else ""
        problems += [f"the SLSA provenance's {p} differs from the bundle's ledger"
                     for p in _differences(jsonable(provenance(facts)), slsa["predicate"])][:6]
    if trust.policy is not None and trust.policy.origin is not None and trust.policy.origin != facts["origin"]:
        problems.append(f"origin {facts['origin']!r} is not the policy's {trust.policy.origin!r}")
    if not problems and "LEDGER.md" in scanned.files and isinstance(state.get("subjects"), dict):
        card = model_card(facts, state["subjects"], has_oms="model.sig" in scanned.files).encode("utf-8")
        state["card"] = scanned.files["LEDGER.md"] == len(card) and read_regular(
            root / "LEDGER.md", what="LEDGER.md", limit=len(card)) == card
    data = {"tree_size": facts["ledger"]["treeSize"], "root": facts["ledger"]["rootHash"], "origin": facts["origin"],
            "heads": len(heads), "timestamps": len(stamps)}
    if problems:
        return CheckResult("release", Status.FAIL, "; ".join(problems), data)
    return CheckResult("release", Status.PASS, f"the attested run {facts['runId']}, tree of "
                       f"{facts['ledger']['treeSize']} entries (root {facts['ledger']['rootHash'][:16]}…), key ids, "
                       f"init and sealed tensor digests and {len(heads)} head(s) / {len(stamps)} timestamp(s) "
                       "equal the bundle's ledger", data)


def _oms_check(root: Path, scanned: Scan, trust: Trust, entry: str | None, state: State) -> CheckResult:
    known = {**{ident: key for ident, (key, _) in trust.shipped.items()}, **trust.keys}
    signers = [known[ident].algorithm for ident in sorted(state.get("signers", ())) if ident in known]
    if "model.sig" not in scanned.files:
        if signers and set(signers) == {"ed25519"}:
            return CheckResult("oms", Status.SKIP, "no model.sig: the attestations are signed by Ed25519 keys only, "
                               "and OMS key signatures need ECDSA P-256", summary="no model.sig (Ed25519 release key)")
        return CheckResult("oms", Status.FAIL, "model.sig is missing: " + (
            "a P-256 key signed the attestations, and publish writes model.sig for one" if signers else
            "no verified signature shows the release key to be Ed25519"))
    if state.get("names_differ"):
        return CheckResult("oms", Status.SKIP, "not checked: the files in model/ are not the attested ones (check "
                           "subjects)", summary="subjects failed")
    if not _oms.available():
        return CheckResult("oms", Status.SKIP, f"checking model.sig needs model-signing: {_oms.EXTRA_LINE}",
                           summary="model-signing not installed")
    if scanned.files["model.sig"] > _oms.MAX_SIGNATURE_BYTES:
        return CheckResult("oms", Status.FAIL, f"model.sig is larger than {_oms.MAX_SIGNATURE_BYTES} bytes")
    trusted = [(ident, path) for ident, path in trust.paths.items() if trust.keys[ident].algorithm == "p256"]
    candidates = trusted or ([] if trust.release_given else
                             [(ident, path) for ident, (key, path) in trust.shipped.items() if key.algorithm == "p256"])
    why = "no P-256 key to check it with"
    for ident, path in candidates:
        why = _oms.verify(root / "model", root / "model.sig", path) or ""
        if not why:
            if trusted:
                return CheckResult("oms", Status.PASS, f"model_signing accepts model.sig over model/ under the "
                                   f"accepted key {ident[:16]}…", {"key_id": ident})
            return CheckResult("oms", Status.WARN, f"self-consistent, signer not authenticated: model_signing accepts "
                               f"model.sig under the bundle's own release.pub (key id {ident[:16]}…)",
                               {"key_id": ident}, summary="self-consistent, signer not authenticated")
    return CheckResult("oms", Status.FAIL, f"model_signing rejects model.sig: {why}")


_CHECKS: tuple[tuple[str, Callable[[Path, Scan, Trust, str | None, State], CheckResult]], ...] = (
    ("attestations", _attestations), ("subjects", _subjects), ("release", _release), ("oms", _oms_check))


def run_bundle_checks(root: Path, scanned: Scan, trust: Trust, entry: str | None, why: list[str],
                      state: State) -> list[CheckResult]:
    """Run the bundle checks in order (the layout is sound: no link, no special file); ``entry`` is the
    weights entry, None with the reasons ``why`` there is none. ``state`` collects what later steps
    need (``card``: LEDGER.md is the card publish writes)."""
    if entry is None:
        first = CheckResult("bundle", Status.FAIL, "; ".join(why), {"files": len(scanned.files), "entry": None})
    else:
        first = CheckResult("bundle", Status.PASS, f"{len(scanned.files)} regular files, no links or special files; "
                            f"weights entry {entry} and no other weight file in model/",
                            {"files": len(scanned.files), "entry": entry})
    results = [first]
    for name, run in _CHECKS:
        try:
            result = run(root, scanned, trust, entry, state)
        except ConfigurationError:
            raise
        except FormatError as exc:
            result = CheckResult(name, Status.FAIL, f"could not be completed: {exc}")
        except Exception as exc:  # noqa: BLE001 - hostile content must not end the run
            result = CheckResult(name, Status.FAIL, f"could not be completed: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:300]}")
        results.append(result)
    return results


__all__ = ["run_bundle_checks"]
