"""Attestations of a release (docs/PUBLISHING.md): in-toto Statements v1 in DSSE envelopes.

Two statements describe a release: one with our predicate (:data:`LEDGER_PREDICATE`: run id, the
ledger's tree size and root, key ids, init and final fingerprints, recipe digest, heads and TSA
anchors) and one SLSA Provenance v1 for the training run. Both have the model files (name and
SHA-256) as subjects. Each is a DSSE envelope signed with the release key over
``PAE(payloadType, payload)``; this module is pure (bytes and dicts in, bytes and dicts out).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ledger._crypto import ReleaseKey, ReleaseSigner
from ledger.errors import FormatError

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
LEDGER_PREDICATE = "https://training-ledger.dev/attestation/ledger/v1"
SLSA_PREDICATE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://training-ledger.dev/buildtype/training-run/v1"
BUILDER_ID = "https://training-ledger.dev/recorder/v1"
ROOT_DIGEST = "rfc9162_sha256"  # digest-set key of an RFC 9162 Merkle tree head (not a file's SHA-256)
MAX_ENVELOPE_BYTES = 16 << 20  # one line of attestations.intoto.jsonl
MAX_SIGNATURES = 64


# ----------------------------------------------------------------------------- DSSE
def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``."""
    encoded = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(encoded), encoded, len(payload), payload)


def canonical_json(value: Any) -> bytes:
    """The bytes a statement is signed as: JSON, keys sorted, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def seal_envelope(statement: Mapping[str, Any], signers: Sequence[ReleaseSigner]) -> dict[str, Any]:
    """A DSSE envelope of ``statement`` with one signature per signer (``keyid``: hex key id)."""
    payload = canonical_json(statement)
    message = pae(PAYLOAD_TYPE, payload)
    return {"payload": base64.b64encode(payload).decode("ascii"), "payloadType": PAYLOAD_TYPE,
            "signatures": [{"keyid": s.public.key_id.hex(), "sig": base64.b64encode(s.sign(message)).decode("ascii")}
                           for s in signers]}


@dataclass(frozen=True, slots=True)
class Opened:
    """An envelope read back: its statement, the key ids whose signatures verified, and the key ids
    of signatures that did not (unknown keys are neither)."""

    statement: dict[str, Any]
    verified: tuple[str, ...]
    bad: tuple[str, ...]


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"{what} is not valid base64") from None


def open_envelope(line: bytes, keys: Mapping[str, ReleaseKey]) -> Opened:
    """Parse one envelope line and check its signatures against ``keys`` (hex key id → key).
    A signature whose key id is not in ``keys`` is ignored; the statement is returned whatever the
    signatures say (the caller decides). FormatError when the bytes are not a DSSE envelope of an
    in-toto statement."""
    if len(line) > MAX_ENVELOPE_BYTES:
        raise FormatError(f"an envelope is {len(line)} bytes, more than {MAX_ENVELOPE_BYTES}")
    try:
        envelope = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise FormatError(f"an envelope is not JSON ({str(exc)[:120]})") from None
    if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
        raise FormatError(f"an envelope is not a DSSE envelope of payloadType {PAYLOAD_TYPE}")
    payload = _b64(envelope.get("payload"), "the envelope payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not 0 < len(signatures) <= MAX_SIGNATURES:
        raise FormatError(f"an envelope has no list of 1 to {MAX_SIGNATURES} signatures")
    message = pae(PAYLOAD_TYPE, payload)
    verified: list[str] = []
    bad: list[str] = []
    for entry in signatures:
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid"), str):
            raise FormatError("an envelope signature has no keyid")
        keyid, sig = entry["keyid"], _b64(entry.get("sig"), "an envelope signature")
        key = keys.get(keyid)
        if key is not None:
            (verified if key.verify(message, sig) and keyid not in verified else bad).append(keyid)
    try:
        statement = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FormatError("an envelope's payload is not JSON") from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise FormatError(f"an envelope's payload is not an in-toto Statement ({STATEMENT_TYPE})")
    if not isinstance(statement.get("subject"), list) or not isinstance(statement.get("predicate"), dict):
        raise FormatError("an in-toto statement without a subject list or a predicate")
    return Opened(statement, tuple(verified), tuple(bad))


# ----------------------------------------------------------------------------- statements
def statement(subjects: Mapping[str, str], predicate_type: str, predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1 over ``subjects`` (file name → hex SHA-256, sorted by name)."""
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": name, "digest": {"sha256": subjects[name]}} for name in sorted(subjects)],
            "predicateType": predicate_type, "predicate": dict(predicate)}


def jsonable(value: Any, depth: int = 0) -> Any:
    """A CBOR value from a ledger as JSON: bytes as hex, numpy-like arrays as lists, non-finite
    floats and anything else as text."""
    if depth > 64:
        raise FormatError("a value nests more than 64 levels deep")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist(), depth + 1)
    return repr(value)


def provenance(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The SLSA Provenance v1 predicate of a training run from the release facts (see
    :func:`ledger._publish.release_facts`): genesis config as external parameters; recipe, code
    and the batch-digest root as resolved dependencies; the ledger's tree head as a byproduct."""
    deps: list[dict[str, Any]] = []
    recipe = facts.get("recipe")
    if recipe:
        deps.append({"name": "recipe", "digest": {"sha256": recipe["sourceSha256"]},
                     "annotations": {"class": recipe.get("class", "")}})
    code = facts.get("code") or {}
    if code.get("gitCommit"):
        deps.append({"name": "code", "digest": {"gitCommit": code["gitCommit"]},
                     "annotations": {"dirty": bool(code.get("gitDirty"))}})
    for name, digest in sorted((code.get("sources") or {}).items()):
        deps.append({"name": f"code/{name}", "digest": {"sha256": digest}})
    batches = facts.get("batches")
    if batches:
        deps.append({"name": "batch-digests", "digest": {ROOT_DIGEST: batches["root"]},
                     "annotations": {"steps": batches["steps"], "leaves": "step batch digests in seq order"}})
    ledger = facts["ledger"]
    return {
        "buildDefinition": {"buildType": BUILD_TYPE,
                            "externalParameters": {"runId": facts["runId"], "config": facts.get("config", {}),
                                                   "seed": facts.get("seed")},
                            "resolvedDependencies": deps},
        "runDetails": {"builder": {"id": BUILDER_ID, "version": {"training-ledger": facts.get("version", "")}},
                       "metadata": {"invocationId": facts["runId"],
                                    **{k: facts[k] for k in ("startedOn", "finishedOn") if facts.get(k)}},
                       "byproducts": [{"name": "ledger", "digest": {ROOT_DIGEST: ledger["rootHash"]},
                                       "annotations": {"treeSize": ledger["treeSize"], "origin": facts["origin"]}}]},
    }


__all__ = ["BUILD_TYPE", "LEDGER_PREDICATE", "PAYLOAD_TYPE", "ROOT_DIGEST", "SLSA_PREDICATE", "STATEMENT_TYPE",
           "Opened", "canonical_json", "jsonable", "open_envelope", "pae", "provenance", "seal_envelope",
           "statement"]
