"""What a release attests about its ledger, read from the ledger itself (docs/PUBLISHING.md).

:func:`ledger_facts` is used twice: by ``publish`` to write the predicate and by ``verify`` on a
bundle to recompute every value the predicate states from the bundle's own ledger; the two are
then compared field by field. :func:`heads_of` lists the tree heads and RFC 3161 tokens stored in
``ledger/heads/`` (by size, with the SHA-256 of each file).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path
from typing import Any

from ledger._attest import jsonable
from ledger._blocked import TENSOR_V1
from ledger._io import read_regular
from ledger._note import open_note, origin_of
from ledger._record import Kind, entry_hash, merkle_root
from ledger.errors import FormatError

MAX_HEAD_FILE = 1 << 20  # a note is ~200 bytes, a TSA token a few KiB
MAX_HEAD_FILES = 100_000
_HEAD_FILE = re.compile(r"^(0|[1-9][0-9]{0,19})\.(note|tsr)$")


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _digests(digests: dict[str, bytes]) -> dict[str, str]:
    return {name: digests[name].hex() for name in sorted(digests)}


def ledger_facts(ledger_dir: Path, *, entry: str, version: str = "") -> dict[str, Any]:
    """The facts of a sealed ledger: run id and origin, tree size and RFC 9162 root over every
    entry (the seal included), the trainer key, init and final fingerprints, recipe and code
    digests, genesis config and seed, the batch-digest root, start and finish times. ``entry`` is
    the weights' entry file in the bundle. FormatError when the ledger is not sealed."""
    from ledger._reader import Ledger
    from ledger._schema import Genesis, SealBody

    book = Ledger(ledger_dir)
    hashes: list[bytes] = []
    batches: list[bytes] = []
    genesis_body: dict[str, Any] = {}
    last = None
    for item in book.entries():
        hashes.append(item.hash)
        if item.kind is Kind.GENESIS and not genesis_body:
            genesis_body = item.body()
        elif item.kind is Kind.STEP:
            digest = item.body().get("batch_digest")
            if isinstance(digest, bytes):
                batches.append(digest)
        last = item
    if last is None or last.kind is not Kind.SEAL:
        raise FormatError(f"{ledger_dir} is not sealed: a release is made of a finished run")
    genesis, seal = Genesis.from_body(genesis_body), SealBody.from_body(last.body())
    if seal.final is None:
        raise FormatError(f"{ledger_dir}: the seal commits to no final weights (not written by the recorder)")
    facts: dict[str, Any] = {
        "runId": genesis.run_id, "origin": origin_of(genesis.run_id), "formatVersion": genesis.format,
        "version": version, "config": jsonable(genesis.config), "seed": genesis.seed,
        "ledger": {"treeSize": len(hashes), "rootHash": merkle_root(hashes).hex(), "head": hashes[-1].hex(),
                   "sealTreeRoot": seal.tree_root.hex()},
        "keys": {"trainer": {"keyId": genesis.key_id.hex(), "algorithm": "ed25519",
                             "publicKey": genesis.public_key.hex()}},
        "weights": {"file": entry,
                    "digestScheme": genesis.fingerprints.tensor_digest if genesis.fingerprints else TENSOR_V1,
                    "final": {"modelDigest": seal.final.model_digest.hex(),
                              "tensorDigests": _digests(seal.final.tensor_digests)}},
        "startedOn": _iso(genesis.created_ns) if genesis.created_ns else "", "finishedOn": _iso(last.time_ns),
    }
    if genesis.init is not None:
        facts["weights"]["init"] = {"modelDigest": genesis.init.model_digest.hex(),
                                    "tensorDigests": _digests(genesis.init.tensor_digests)}
    recipe = genesis.recipe or {}
    if isinstance(recipe.get("source_sha256"), bytes):
        facts["recipe"] = {"class": str(recipe.get("class", "")), "sourceSha256": recipe["source_sha256"].hex()}
    code = genesis.code
    facts["code"] = {"gitCommit": code.get("git_commit") if isinstance(code.get("git_commit"), str) else None,
                     "gitDirty": bool(code.get("git_dirty")),
                     "sources": {str(k): v.hex() for k, v in (code.get("sources") or {}).items()
                                 if isinstance(v, bytes)}}
    if batches:
        facts["batches"] = {"root": merkle_root([entry_hash(b) for b in batches]).hex(), "steps": len(batches)}
    return facts


def head_files(ledger_dir: Path) -> list[tuple[int, str, Path]]:
    """(size, "note" | "tsr", path) of the files in ``ledger_dir/heads`` named like heads, sorted;
    other names are ignored. FormatError for more than MAX_HEAD_FILES."""
    heads = ledger_dir / "heads"
    if not heads.is_dir() or heads.is_symlink():
        return []
    found = []
    for item in heads.iterdir():
        match = _HEAD_FILE.match(item.name)
        if match:
            found.append((int(match.group(1)), match.group(2), item))
            if len(found) > MAX_HEAD_FILES:
                raise FormatError(f"{heads} holds more than {MAX_HEAD_FILES} head files")
    return sorted(found, key=lambda t: (t[0], t[1]))


def heads_of(ledger_dir: Path, facts: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The tree heads (``heads/N.note``) and timestamp tokens (``heads/N.tsr``) beside the ledger, as
    the predicate lists them (size, bundle path, SHA-256). The head of the whole ledger, when there,
    must carry the same root as the entries (FormatError otherwise)."""
    heads: list[dict[str, Any]] = []
    stamps: list[dict[str, Any]] = []
    size, root = facts["ledger"]["treeSize"], facts["ledger"]["rootHash"]
    public = bytes.fromhex(facts["keys"]["trainer"]["publicKey"])
    for n, kind, path in head_files(ledger_dir):
        data = read_regular(path, what="tree head file", limit=MAX_HEAD_FILE)
        item = {"size": n, "file": f"ledger/heads/{path.name}", "sha256": hashlib.sha256(data).hexdigest()}
        if kind == "note":
            head, signed = open_note(data, public)
            note_size, note_root = head.size, head.root
            if note_size != n:
                raise FormatError(f"{path} holds a head of size {note_size}, not {n}")
            if n == size and note_root.hex() != root:
                raise FormatError(f"{path}: the final tree head's root differs from the ledger's entries")
            item["signedByTrainer"] = signed
        (heads if kind == "note" else stamps).append(item)
    return heads, stamps


def ledger_predicate(facts: dict[str, Any], heads: list[dict[str, Any]],
                     stamps: list[dict[str, Any]]) -> dict[str, Any]:
    """The predicate of type ``https://training-ledger.dev/attestation/ledger/v1`` (docs/PUBLISHING.md)
    from the facts (with ``keys.release`` set), the heads and the timestamp tokens."""
    predicate = {k: facts[k] for k in ("runId", "origin", "formatVersion", "ledger", "keys", "weights")}
    predicate["recipe"] = facts.get("recipe")
    predicate["heads"], predicate["timestamps"] = heads, stamps
    result: dict[str, Any] = jsonable(predicate)
    return result


__all__ = ["head_files", "heads_of", "ledger_facts", "ledger_predicate"]
