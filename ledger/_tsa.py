"""RFC 3161 trusted timestamps of tree heads: the request, the response's checks, the token's verification.

A head is timestamped over SHA-256 of its note *text* (docs/FORMAT.md §13, Timestamps). The token
kept is the TSA's whole DER ``TimeStampResp`` (at most :data:`MAX_TOKEN` bytes): :func:`request`
builds the query (SHA-256, a nonce, the TSA's certificate asked for), :func:`accept` checks an
answer against its query when it arrives (granted, same imprint, same nonce), and
:func:`verify_token` checks a stored token against trusted roots (:func:`load_roots`): the CMS
signature chains to one of them, the signing certificate carries the critical ``timeStamping``
extended key usage, and the imprint is the head's digest — and returns the TSA's ``genTime`` and
its stated accuracy.
Parsing and the signature checks are the ``rfc3161-client`` library's (the ``tsa`` extra); its
exceptions are wrapped here into :class:`~ledger.errors.FormatError` (bytes that are not a token)
and :class:`~ledger.errors.VerificationError` (a token that does not prove what it should).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from dataclasses import dataclass
from typing import Any

from ledger._io import KiB, MiB, read_regular
from ledger.errors import ConfigurationError, FormatError, VerificationError

MAX_TOKEN = 64 * KiB  # a DER TimeStampResp: a few KiB with its certificates
MAX_ROOTS_FILE = 1 * MiB
MAX_ROOTS = 256
SHA256_OID = "2.16.840.1.101.3.4.2.1"
QUERY_TYPE, REPLY_TYPE = "application/timestamp-query", "application/timestamp-reply"
_GRANTED = 0
# what must never be swallowed where a third-party parser's failure is caught (a Rust panic is a BaseException)
_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass(frozen=True, slots=True)
class Request:
    """A DER ``TimeStampReq`` (``der``) for SHA-256 ``digest``, with the ``nonce`` it carries."""

    der: bytes
    digest: bytes
    nonce: int


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a token says: the SHA-256 ``digest`` it covers, when (``time``, the TSA's genTime, UTC),
    its ``serial`` number, who signed it (``tsa``: the signing certificate's subject) and the
    ``accuracy`` of genTime the TSA states (None when it states none)."""

    digest: bytes
    time: _dt.datetime
    serial: int
    tsa: str
    accuracy: _dt.timedelta | None = None

    @property
    def latest(self) -> _dt.datetime:
        """The latest time the token allows: genTime plus its stated accuracy (RFC 3161 §2.4.2)."""
        return self.time + (self.accuracy or _dt.timedelta(0))


def _library() -> Any:
    try:
        import rfc3161_client
    except ImportError:
        raise ConfigurationError("trusted timestamps need rfc3161-client, which is not installed: "
                                 "pip install 'training-ledger[tsa]'") from None
    return rfc3161_client


def require() -> None:
    """Raise :class:`ConfigurationError` naming the pip line when ``rfc3161-client`` is absent."""
    _library()


def request(message: bytes) -> Request:
    """A time-stamp query for SHA-256 of ``message`` (a head's note text), with a fresh nonce, asking
    for the TSA's certificate in the answer."""
    lib = _library()
    built = lib.TimestampRequestBuilder(data=message, hash_algorithm=lib.HashAlgorithm.SHA256, nonce=True,
                                        cert_req=True).build()
    return Request(bytes(built.as_bytes()), hashlib.sha256(message).digest(), int(built.nonce))


def _parse(token: bytes) -> Any:
    """The library's ``TimeStampResponse`` for ``token``; FormatError for bytes that are not one."""
    if not isinstance(token, bytes) or not token:
        raise FormatError("a timestamp token is empty or not bytes")
    if len(token) > MAX_TOKEN:
        raise FormatError(f"a timestamp token of {len(token)} bytes is more than the {MAX_TOKEN} allowed")
    lib = _library()
    try:
        response = lib.decode_timestamp_response(token)
        if response.status != _GRANTED:
            raise FormatError(f"the TSA did not grant the timestamp (status {response.status}: "
                              f"{'; '.join(map(str, response.status_string))[:200] or 'no text'})")
        response.tst_info.message_imprint  # noqa: B018 - a granted answer holds a token: decode it now
    except FormatError:
        raise
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # noqa: BLE001 - the parser's errors (and panics) on crafted bytes
        raise FormatError(f"not a time-stamp response: {_one_line(exc)}") from None
    return response


def _imprint(response: Any) -> bytes:
    imprint = response.tst_info.message_imprint
    if imprint.hash_algorithm.dotted_string != SHA256_OID:
        raise VerificationError(f"the token's imprint uses {imprint.hash_algorithm.dotted_string}, not SHA-256")
    return bytes(imprint.message)


def accept(answer: bytes, query: Request) -> Stamp:
    """Check a TSA's answer to ``query`` as it arrives: a granted ``TimeStampResp`` of at most
    :data:`MAX_TOKEN` bytes whose imprint is the query's digest and whose nonce is the query's.
    Returns what it says (its signature is checked by :func:`verify_token`, against roots)."""
    response = _parse(answer)
    if _imprint(response) != query.digest:
        raise VerificationError("the TSA's token covers another digest than the one asked for")
    if response.tst_info.nonce != query.nonce:
        raise VerificationError("the TSA's token carries another nonce than the query (a replayed answer)")
    return _stamp(response)


def _stamp(response: Any) -> Stamp:
    info = response.tst_info
    when = info.gen_time
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return Stamp(_imprint(response), when, int(info.serial_number), _signer_name(response), _accuracy(info))


def _accuracy(info: Any) -> _dt.timedelta | None:
    """The token's accuracy as a duration (seconds, millis, micros), None when absent or unreadable."""
    try:
        stated = info.accuracy
        if stated is None:
            return None
        return _dt.timedelta(seconds=int(stated.seconds or 0), milliseconds=int(stated.millis or 0),
                             microseconds=int(stated.micros or 0))
    except Exception:  # noqa: BLE001 - an absent or malformed optional field reads as "not stated"
        return None


def _signer_name(response: Any) -> str:
    """The subject of the certificate that signed the token (as it names itself; "?" when absent)."""
    from cryptography import x509

    try:
        (signer,) = list(response.signed_data.signer_infos)
        for der in response.signed_data.certificates:
            cert = x509.load_der_x509_certificate(der)
            if cert.issuer == signer.issuer and cert.serial_number == signer.serial_number:
                return str(cert.subject.rfc4514_string())[:200]
    except Exception:  # noqa: BLE001, S110 - a name is only shown: a malformed certificate leaves it unknown
        pass
    return "?"


def load_roots(path: str | os.PathLike[str]) -> tuple[Any, ...]:
    """The trusted TSA root certificates in a PEM file (``--tsa-roots``): at most
    :data:`MAX_ROOTS_FILE` bytes and :data:`MAX_ROOTS` certificates, at least one.
    :class:`ConfigurationError` (exit 2) for a file that is none of that."""
    from cryptography import x509

    try:
        data = read_regular(path, what="TSA roots file", limit=MAX_ROOTS_FILE, error=ConfigurationError)
    except FileNotFoundError:
        raise ConfigurationError(f"TSA roots file {os.fsdecode(path)} does not exist") from None
    try:
        roots = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise ConfigurationError(f"TSA roots file {os.fsdecode(path)} holds no readable PEM certificate "
                                 f"({_one_line(exc)})") from None
    if len(roots) > MAX_ROOTS:
        raise ConfigurationError(f"TSA roots file {os.fsdecode(path)} holds {len(roots)} certificates; at most "
                                 f"{MAX_ROOTS} are read")
    return roots


def verify_token(token: bytes, digest: bytes, roots: tuple[Any, ...]) -> Stamp:
    """Verify a stored token: a granted response whose CMS signature chains to one of ``roots`` (valid
    at its genTime), signed by a certificate with the critical ``timeStamping`` extended key usage,
    over SHA-256 ``digest``. Returns what it says; :class:`FormatError` for bytes that are not a
    token, :class:`VerificationError` for one that does not verify, saying why."""
    if not roots:
        raise ConfigurationError("no trusted TSA root given")
    response = _parse(token)
    if _imprint(response) != digest:
        raise VerificationError("the token covers another digest (it timestamps another head)")
    lib = _library()
    try:
        lib.VerifierBuilder(roots=list(roots)).build().verify(response, digest)
    except lib.VerificationError as exc:
        raise VerificationError(f"the token does not verify against the TSA roots: {_one_line(exc)}") from None
    except _PASS_THROUGH:
        raise
    except BaseException as exc:  # noqa: BLE001 - the library's other errors on crafted tokens
        raise VerificationError(f"the token could not be verified: {_one_line(exc)}") from None
    return _stamp(response)


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "…"


__all__ = ["MAX_TOKEN", "QUERY_TYPE", "REPLY_TYPE", "Request", "Stamp", "accept", "load_roots", "request",
           "require", "verify_token"]
