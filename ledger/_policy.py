"""The trust policy for verifying a release bundle: ``ledger verify DIR --policy FILE.toml``.

There is no C2SP or in-toto standard for this, so the file is small and ours (docs/PUBLISHING.md)::

    origin = "training-ledger/3f2a…"      # optional: the run (tree-head origin) the policy accepts
    min_signatures = 1                     # accepted keys that must have signed each attestation
    keys = ["keys/release.pub", "keys/trainer.pub"]   # PEM public keys, relative to this file
    key_ids = ["9c1e…"]                    # or key ids (hex SHA-256, as `ledger verify` prints them)

A key listed by id accepts a key shipped in the bundle (``release.pub``, ``ledger/key.pub``) whose
id matches: the id is a hash of the key, so it pins the key as the PEM would.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger._crypto import ReleaseKey, load_release_key
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


__all__ = ["Policy", "load_policy", "parse_policy"]
