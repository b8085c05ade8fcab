"""OpenSSF Model Signing (OMS) signatures of a release's ``model/`` directory, via ``model_signing``.

``model.sig`` is what ``model_signing verify key --signature DIR/model.sig --public_key RELEASE.pub
DIR/model`` accepts: a Sigstore bundle holding a DSSE envelope of an in-toto statement whose
subjects are the files' SHA-256 (OMS "files" serialization, git files ignored, no symlinks). OMS key
mode accepts ECDSA keys only (P-256/384/521): the release key must be P-256 for this signature.
``model_signing`` (extra ``publish``) is imported only inside these functions.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ledger.errors import ConfigurationError

EXTRA_LINE = "pip install 'training-ledger[publish]'"
MAX_SIGNATURE_BYTES = 1 << 20  # a key-mode model.sig of a model with thousands of files is well under this


def available() -> bool:
    """True when ``model_signing`` (and ``OpenSSL``, which it needs) can be imported."""
    return importlib.util.find_spec("model_signing") is not None and importlib.util.find_spec("OpenSSL") is not None


def _require() -> None:
    if not available():
        raise ConfigurationError(f"the OMS signature (model.sig) needs model-signing and pyopenssl: {EXTRA_LINE}")


def _quiet() -> None:
    """model_signing logs every file it hashes at INFO on the root logger's handlers: keep ours quiet."""
    logging.getLogger("model_signing").setLevel(logging.WARNING)


def sign(model_dir: str | os.PathLike[str], signature: str | os.PathLike[str], private_key: str | os.PathLike[str],
         passphrase: bytes | None = None) -> None:
    """Write the OMS signature of ``model_dir`` to ``signature`` with the P-256 PEM ``private_key``."""
    _require()
    _quiet()
    from model_signing import signing

    try:
        signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
            # model_signing annotates password as str but hands it to cryptography, which takes bytes
            private_key=Path(private_key), password=passphrase,  # type: ignore[arg-type]
        ).sign(Path(model_dir), Path(signature))
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigurationError(f"model_signing could not sign {model_dir}: {str(exc)[:300]}") from exc


def verify(model_dir: str | os.PathLike[str], signature: str | os.PathLike[str],
           public_key: str | os.PathLike[str]) -> str | None:
    """Check the OMS signature ``signature`` of ``model_dir`` under the PEM ``public_key`` with
    ``model_signing``'s verifier: None when it holds, else why not (one line)."""
    _require()
    _quiet()
    from model_signing import verifying

    try:
        config = verifying.Config()  # type: ignore[no-untyped-call]
        config.use_elliptic_key_verifier(public_key=Path(public_key)).verify(Path(model_dir), Path(signature))
    except Exception as exc:  # noqa: BLE001 - model_signing raises ValueError, protobuf and crypto errors alike
        text = " ".join(str(exc).split()) or type(exc).__name__
        return text if len(text) <= 400 else text[:400] + "…"
    return None


__all__ = ["MAX_SIGNATURE_BYTES", "available", "sign", "verify"]
