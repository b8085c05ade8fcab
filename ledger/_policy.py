"""The trust policy for verifying a release bundle: ``ledger verify DIR --policy FILE.toml``.

There is no C2SP or in-toto standard for this, so the file is small and ours (docs/PUBLISHING.md)::

    origin = "training-ledger/3f2a…"      # optional: the run (tree-head origin) the policy accepts
    min_signatures = 1                     # accepted keys that must have signed each attestation
    keys = ["keys/release.pub", "keys/trainer.pub"]   # PEM public keys, relative to this file
    key_ids = ["9c1e…"]                    # or key ids (hex SHA-256, as `ledger verify` prints them)

A key listed by id accepts a key shipped in the bundle (``release.pub``, ``ledger/key.pub``) whose
id matches: the id is a hash of the key, so it pins the key as the PEM would. A key file, a policy
file or a policy's key path that lies inside the bundle being verified is refused (exit 2): whoever
made the bundle made those files too. :func:`trust_for` gathers the trust inputs of one verification.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger._crypto import PublicKey, ReleaseKey, load_public_key, load_release_key
from ledger._io import KiB, read_regular
from ledger.errors import ConfigurationError

MAX_POLICY_BYTES = 64 * KiB
MAX_KEYS = 256
_FIELDS = frozenset({"origin", "min_signatures", "keys", "key_ids"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Policy:
    """Accepted keys (loaded, with the path each came from), accepted key ids, the origin line the
    release must carry (None: any), and the number of accepted signatures each attestation needs."""

    keys: tuple[tuple[ReleaseKey, Path], ...] = ()
    key_ids: frozenset[str] = frozenset()
    origin: str | None = None
    min_signatures: int = 1

    def accepts(self, key_id: bytes) -> bool:
        """True when the key with this id is accepted (listed as a key or by id)."""
        return key_id.hex() in self.key_ids or any(k.key_id == key_id for k, _ in self.keys)


def _strings(table: dict[str, Any], name: str, where: str) -> list[str]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > MAX_KEYS:
        raise ConfigurationError(f"policy {where}: {name} must be a list of at most {MAX_KEYS} strings")
    return value


def parse_policy(text: bytes, base: Path, where: str) -> Policy:
    """Read a policy from TOML bytes; key paths are relative to ``base``. One clear line
    (ConfigurationError, exit 2) for anything wrong: unknown fields are refused, not ignored."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ConfigurationError("--policy needs Python 3.11 or later (tomllib)") from None
    try:
        table = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"policy {where} is not TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or table
        raise ConfigurationError(f"policy {where} nests too deeply to be a policy") from None
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise ConfigurationError(f"policy {where}: unknown field(s) {', '.join(unknown)} (known: "
                                 f"{', '.join(sorted(_FIELDS))})")
    origin = table.get("origin")
    if origin is not None and (not isinstance(origin, str) or not origin or "\n" in origin):
        raise ConfigurationError(f"policy {where}: origin must be one non-empty line of text")
    minimum = table.get("min_signatures", 1)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or not 1 <= minimum <= MAX_KEYS:
        raise ConfigurationError(f"policy {where}: min_signatures must be an integer from 1 to {MAX_KEYS}")
    ids = [v.lower() for v in _strings(table, "key_ids", where)]
    for value in ids:
        if not _HEX64.match(value):
            raise ConfigurationError(f"policy {where}: key id {value[:80]!r} is not 64 hex digits")
    keys = []
    for name in _strings(table, "keys", where):
        path = Path(name) if os.path.isabs(name) else base / name
        keys.append((load_release_key(path), path))
    if not keys and not ids:
        raise ConfigurationError(f"policy {where} accepts no key: list keys (PEM paths) or key_ids")
    if minimum > len(keys) + len(ids):
        raise ConfigurationError(f"policy {where}: min_signatures = {minimum} but only {len(keys) + len(ids)} "
                                 "key(s) are accepted")
    return Policy(tuple(keys), frozenset(ids), origin, minimum)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load the policy file at ``path`` (a regular file of at most 64 KiB)."""
    try:
        data = read_regular(path, what="policy file", limit=MAX_POLICY_BYTES, error=ConfigurationError)
    except FileNotFoundError:
        raise ConfigurationError(f"policy file {os.fsdecode(path)} does not exist") from None
    return parse_policy(data, Path(path).parent, os.fsdecode(path))


def refuse_inside(root: Path, path: str | os.PathLike[str], what: str) -> None:
    """ConfigurationError (exit 2) when ``path`` resolves to a file inside the bundle ``root``: a key
    or policy that comes with the bundle authenticates nothing about it."""
    try:
        inside = os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)
    except ValueError:  # different drives
        inside = False
    if inside:
        raise ConfigurationError(f"{what} {os.fsdecode(path)} lies inside the bundle {os.fsdecode(root)}: a key or "
                                 "policy shipped with a bundle authenticates nothing; give a copy obtained from the "
                                 "publisher, or a policy outside the bundle that lists its key id")


@dataclass(slots=True)
class Trust:
    """What a bundle's verifier trusts: accepted keys by hex id (with the PEM file each came from,
    for ``model_signing``), the policy, the trainer's key for the ledger checks, whether any trust
    input was given (without one, the bundle's own keys make it self-consistent only), and the keys
    shipped in the bundle (by id, with their path)."""

    keys: dict[str, ReleaseKey] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    policy: Policy | None = None
    trainer: PublicKey | None = None
    given: bool = False
    release_given: bool = False  # a release key or a policy was given (not just the trainer's --key)
    shipped: dict[str, tuple[ReleaseKey, Path]] = field(default_factory=dict)


def trust_for(root: Path, shipped: Mapping[str, tuple[ReleaseKey, Path]],
              key: str | os.PathLike[str] | PublicKey | None, release_key: str | os.PathLike[str] | None,
              policy: str | os.PathLike[str] | Policy | None, genesis_key_id: bytes | None) -> Trust:
    """Gather the trust inputs of the bundle at ``root``: ``key`` (the trainer's Ed25519 key),
    ``release_key`` (PEM), ``policy`` (a file or a :class:`Policy`). With a policy only its keys
    sign for the attestations and ``model.sig``; ``key`` then authenticates the ledger's signatures
    only, and ``release_key`` is refused (list it in the policy). Without a policy, ``key`` and
    ``release_key`` are both accepted signers. Shipped keys count only when the policy lists their id;
    any path inside ``root`` is refused (ConfigurationError)."""
    if release_key is not None and policy is not None:
        raise ConfigurationError("give --release-key or --policy, not both: list the release key in the policy")
    for what, path in (("--key", key), ("--release-key", release_key), ("--policy", policy)):
        if path is not None and not isinstance(path, (PublicKey, Policy)):
            refuse_inside(root, path, what)
    trust = Trust(given=any(x is not None for x in (key, release_key, policy)),
                  release_given=release_key is not None or policy is not None, shipped=dict(shipped))
    if isinstance(key, PublicKey):
        trust.trainer = key
    elif key is not None:
        trust.trainer = load_public_key(key)
        if policy is None:
            loaded = load_release_key(key)
            trust.keys[loaded.key_id.hex()], trust.paths[loaded.key_id.hex()] = loaded, Path(key)
    if release_key is not None:
        loaded = load_release_key(release_key)
        trust.keys[loaded.key_id.hex()], trust.paths[loaded.key_id.hex()] = loaded, Path(release_key)
    if policy is not None:
        trust.policy = policy if isinstance(policy, Policy) else load_policy(policy)
        for accepted, path in trust.policy.keys:
            refuse_inside(root, path, "the policy's key")
            trust.keys[accepted.key_id.hex()], trust.paths[accepted.key_id.hex()] = accepted, path
        for ident, (found, path) in trust.shipped.items():
            if ident in trust.policy.key_ids:
                trust.keys[ident], trust.paths[ident] = found, path
    if trust.trainer is None and genesis_key_id is not None:
        match = trust.keys.get(genesis_key_id.hex())
        if match is not None and match.algorithm == "ed25519":
            trust.trainer = PublicKey(match.der[-32:])
    return trust


__all__ = ["Policy", "Trust", "load_policy", "parse_policy", "refuse_inside", "trust_for"]
