"""Ed25519 keys and DSSE signatures, and release keys (Ed25519 or ECDSA P-256): the only module that
touches ``cryptography.hazmat``."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger._io import KiB, read_regular
from ledger._layout import create_file, fsync_dir, make_dirs, remove_dirs, unlink_quietly
from ledger._record import pae
from ledger.errors import ConfigurationError, KeyLoadError, StorageError

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw


def key_id(public_raw: bytes) -> bytes:
    """Key id: SHA-256 of the 32-byte raw Ed25519 public key."""
    return hashlib.sha256(public_raw).digest()


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An Ed25519 public key: raw bytes plus its key id."""

    raw: bytes

    @property
    def key_id(self) -> bytes:
        """SHA-256 of the raw key."""
        return key_id(self.raw)

    def verify(self, record: bytes, signature: bytes) -> bool:
        """True when ``signature`` is a valid signature of ``PAE(record)`` under this key."""
        return verify_raw(self.raw, record, signature)


def verify_raw(public_raw: bytes, record: bytes, signature: bytes) -> bool:
    """Verify a DSSE signature over ``record`` with a raw Ed25519 public key."""
    return verify_bytes(public_raw, pae(record), signature)


def verify_bytes(public_raw: bytes, data: bytes, signature: bytes) -> bool:
    """Verify an Ed25519 signature over ``data`` itself (no PAE; see :meth:`Signer.sign_bytes`)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_many(public_raw: bytes, records: list[bytes], signatures: list[bytes]) -> list[int]:
    """Indices (into ``records``) whose signature does not verify. Runs in the caller's process."""
    key = Ed25519PublicKey.from_public_bytes(public_raw)
    bad = []
    for i, (record, signature) in enumerate(zip(records, signatures, strict=True)):
        try:
            key.verify(signature, pae(record))
        except (InvalidSignature, ValueError):
            bad.append(i)
    return bad


class Signer:
    """Signs records with an Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public = PublicKey(private_key.public_key().public_bytes(_RAW, _RAW_PUB))

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """A signer from a 32-byte Ed25519 seed (test vectors and tests only)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, record: bytes) -> bytes:
        """The 64-byte signature of ``PAE(record)``."""
        return self._key.sign(pae(record))

    def sign_bytes(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data`` itself, no PAE: for formats that define their
        own signed bytes (C2SP signed notes, docs/FORMAT.md §13)."""
        return self._key.sign(bytes(data))


def generate_keypair(prefix: str | os.PathLike[str], passphrase: bytes | None = None,
                     key_type: str = "ed25519") -> tuple[Path, Path]:
    """Write a new key pair — Ed25519 (the trainer's key), or ECDSA P-256 with ``key_type="p256"``
    (a release key, docs/PUBLISHING.md) —: ``PREFIX.pem`` (PKCS#8, mode 0600, encrypted when a
    passphrase is given) and ``PREFIX.pub`` (SubjectPublicKeyInfo PEM). Never overwrites.

    Each file is written to a temporary name, fsynced and linked into place only when whole; on
    any failure neither file (nor a directory this call made) is left behind."""
    prefix = Path(prefix)
    private_path, public_path = prefix.with_name(prefix.name + ".pem"), prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise ConfigurationError(f"{path} already exists; choose another prefix or remove it yourself")
    if key_type not in KEY_TYPES:
        raise ConfigurationError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})")
    key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey = (
        Ed25519PrivateKey.generate() if key_type == "ed25519" else ec.generate_private_key(ec.SECP256R1()))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    made: list[Path] = []
    placed: list[Path] = []
    try:
        made = make_dirs(prefix.parent)
        for path, data, mode in ((private_path, pem, 0o600), (public_path, pub, 0o644)):
            _place(path, data, mode)
            placed.append(path)
        fsync_dir(prefix.parent)
    except BaseException as exc:
        for path in placed:
            unlink_quietly(path)
        remove_dirs(made)
        if isinstance(exc, FileExistsError):
            raise ConfigurationError(f"{exc.filename or prefix} already exists; choose another prefix") from None
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write the key pair at {prefix}: {exc.strerror or exc}") from exc
        raise
    return private_path, public_path


def _place(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` holding ``data`` atomically and never over an existing name: a temporary
    file in the same directory, fsynced, then hard-linked into place (``link`` fails when the name
    exists, like ``O_EXCL``)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    create_file(tmp, data, mode)
    try:
        os.chmod(tmp, mode)  # whatever the umask
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # a file system without hard links: the closest is a checked rename
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path)) from None
            os.rename(tmp, path)
    finally:
        unlink_quietly(tmp)


MAX_KEY_FILE = 64 * KiB  # a PEM Ed25519 key is under 1 KiB


def _read_key_file(path: str | os.PathLike[str]) -> bytes:
    try:
        return read_regular(path, what="key file", limit=MAX_KEY_FILE, error=KeyLoadError)
    except FileNotFoundError:
        raise KeyLoadError(f"key file {os.fsdecode(path)} does not exist; create one with `ledger keygen`") from None


def load_signer(path: str | os.PathLike[str], passphrase: bytes | None = None) -> Signer:
    """Load an Ed25519 private key from a PEM file; one clear error for every way it can fail."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise KeyLoadError(f"private key {path} is encrypted; give its passphrase "
                               "(LEDGER_KEY_PASSPHRASE or passphrase=)") from exc
        raise KeyLoadError(f"private key {path} is not encrypted; give no passphrase") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        if passphrase is not None and b"ENCRYPTED" in data:
            raise KeyLoadError(f"wrong passphrase for private key {path}") from exc
        raise KeyLoadError(f"{path} is not a PEM private key (expected the .pem from `ledger keygen`)") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyLoadError(f"{path} holds a {type(key).__name__.removeprefix('_')}, not an Ed25519 key")
    return Signer(key)


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Load an Ed25519 public key from a PEM file (a private key file is refused)."""
    key = _pem_public(_read_key_file(path), str(path), " (expected the .pub from `ledger keygen`)")
    if not isinstance(key, Ed25519PublicKey):
        raise KeyLoadError(f"{path} holds a {type(key).__name__.removeprefix('_')}, not an Ed25519 key")
    return PublicKey(key.public_bytes(_RAW, _RAW_PUB))


def public_key_pem(raw: bytes) -> bytes:
    """PEM (SubjectPublicKeyInfo) of a raw Ed25519 public key."""
    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# ----------------------------------------------------------------------------- release keys
KEY_TYPES = ("ed25519", "p256")  # `ledger keygen --type`


@dataclass(frozen=True, slots=True)
class ReleaseKey:
    """A release public key (docs/PUBLISHING.md): Ed25519 or ECDSA P-256, held as its DER
    SubjectPublicKeyInfo. Key id: SHA-256 of the raw key for Ed25519 (as the ledger's), of the DER
    SubjectPublicKeyInfo for P-256."""

    algorithm: str  # "ed25519" | "p256"
    der: bytes

    @property
    def key_id(self) -> bytes:
        """The key id (see the class)."""
        if self.algorithm == "ed25519":
            return key_id(self.der[-32:])
        return hashlib.sha256(self.der).digest()

    def pem(self) -> bytes:
        """The SubjectPublicKeyInfo PEM."""
        return serialization.load_der_public_key(self.der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True when ``signature`` is this key's signature of ``data`` (Ed25519 over the bytes;
        ECDSA P-256 with SHA-256, DER-encoded signature)."""
        key = serialization.load_der_public_key(self.der)
        try:
            if isinstance(key, Ed25519PublicKey):
                key.verify(signature, bytes(data))
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, bytes(data), ec.ECDSA(hashes.SHA256()))
            else:
                return False
        except (InvalidSignature, ValueError):
            return False
        return True


def _release_key(key: object, where: str) -> ReleaseKey:
    if isinstance(key, Ed25519PublicKey):
        algorithm = "ed25519"
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = "p256"
    else:
        raise KeyLoadError(f"{where} holds a {type(key).__name__.removeprefix('_')}: a release key is Ed25519 or "
                           "ECDSA P-256 (`ledger keygen --type p256`)")
    return ReleaseKey(algorithm, key.public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _pem_public(data: bytes, where: str, hint: str = "") -> object:
    """The public key in PEM ``data`` (``where`` names it in errors); a private key is refused."""
    if b"PRIVATE KEY" in data:
        raise KeyLoadError(f"{where} is a private key; pass the public key (.pub)")
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyLoadError(f"{where} is not a PEM public key{hint}") from exc


def release_key_from_pem(data: bytes, where: str) -> ReleaseKey:
    """A release public key from PEM bytes (``where`` names them in errors); a private key is refused."""
    return _release_key(_pem_public(data, where), where)


def load_release_key(path: str | os.PathLike[str]) -> ReleaseKey:
    """Load a release public key (Ed25519 or P-256) from a PEM file."""
    return release_key_from_pem(_read_key_file(path), os.fsdecode(path))


class ReleaseSigner:
    """Signs bytes with a release private key (Ed25519, or ECDSA P-256 with SHA-256)."""

    def __init__(self, private_key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey, where: str = "key") -> None:
        self._key = private_key
        self.public = _release_key(private_key.public_key(), where)

    def sign(self, data: bytes) -> bytes:
        """The signature of ``data`` (64 bytes for Ed25519; DER ECDSA for P-256)."""
        if isinstance(self._key, Ed25519PrivateKey):
            return self._key.sign(bytes(data))
        return self._key.sign(bytes(data), ec.ECDSA(hashes.SHA256()))


def load_release_signer(path: str | os.PathLike[str], passphrase: bytes | None = None) -> ReleaseSigner:
    """Load a release private key (Ed25519 or P-256 PEM); one clear error for every way it can fail."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        raise KeyLoadError(f"private key {path} is encrypted; give its passphrase" if passphrase is None
                           else f"private key {path} is not encrypted; give no passphrase") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyLoadError(f"{path} is not a PEM private key (or the passphrase is wrong)") from exc
    if not isinstance(key, (Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
        raise KeyLoadError(f"{path} holds a {type(key).__name__.removeprefix('_')}: a release key is Ed25519 or "
                           "ECDSA P-256")
    return ReleaseSigner(key, os.fsdecode(path))
