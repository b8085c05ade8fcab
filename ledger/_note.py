"""Signed tree heads: C2SP signed notes (https://c2sp.org/signed-note) carrying a C2SP
tlog-checkpoint (https://c2sp.org/tlog-checkpoint). Pure bytes in, bytes out; docs/FORMAT.md §13.

A head of a ledger of ``size`` entries is the note text::

    training-ledger/<run id>\\n<size in decimal>\\n<base64 of the RFC 9162 root>\\n

signed with the trainer's Ed25519 key over exactly those bytes (no PAE), in a signature line
``— <key name> <base64(key hash ‖ signature)>\\n`` after a blank line. The key name is the
origin; the key hash is ``SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key)[:4]`` (0x01: Ed25519).
Parsing is strict and bounded: a note is at most :data:`MAX_NOTE_BYTES`, valid UTF-8 without
control characters other than newline, with at most :data:`MAX_SIGNATURES` signature lines.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from ledger._crypto import Signer, verify_bytes
from ledger._record import HASH_SIZE, SIGNATURE_SIZE
from ledger.errors import FormatError

ORIGIN_PREFIX = "training-ledger/"
MAX_NOTE_BYTES = 16 << 10  # our notes are ~200 bytes; a posted note with many cosignatures stays far below
MAX_SIGNATURES = 100  # as golang.org/x/mod/sumdb/note
MAX_ORIGIN_BYTES = 1024
MAX_SIZE = (1 << 64) - 1
ALG_ED25519 = 0x01
_DASH = "— ".encode()  # U+2014 EM DASH, then a space
_ESCAPE = frozenset("+%")


def _escape(ch: str) -> str:
    if ch in _ESCAPE or ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F:
        return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
    return ch


def origin_of(run_id: str) -> str:
    """The origin line (and key name) of a ledger's tree heads: ``training-ledger/<run id>``.
    Characters a C2SP key name may not hold (white space, ``+``), control characters and ``%``
    are written ``%XX`` per UTF-8 byte, so every run id gives one valid, distinct name."""
    try:
        origin = ORIGIN_PREFIX + "".join(_escape(ch) for ch in run_id)
        encoded = origin.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError("the run id is not valid Unicode text (a lone surrogate)") from None
    if len(encoded) > MAX_ORIGIN_BYTES:
        raise FormatError(f"the run id makes an origin longer than {MAX_ORIGIN_BYTES} bytes")
    return origin


def valid_name(name: str) -> bool:
    """A C2SP key name: non-empty, no Unicode white space, no ``+``, no control characters."""
    return bool(name) and "+" not in name and not any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F
                                                      for ch in name)


def key_hash(name: str, public_raw: bytes) -> bytes:
    """The 4-byte C2SP key hash of an Ed25519 key under ``name``:
    ``SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key)[:4]``."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + bytes(public_raw)).digest()[:4]


def verifier_key(name: str, public_raw: bytes) -> str:
    """The C2SP verifier key string ``<name>+<hex key hash>+<base64(0x01 ‖ public key)>``
    (what a lab publishes so that note tooling can check its heads)."""
    return f"{name}+{key_hash(name, public_raw).hex()}+{base64.b64encode(bytes([ALG_ED25519]) + public_raw).decode()}"


@dataclass(frozen=True, slots=True)
class TreeHead:
    """A checkpoint: the log ``origin``, its ``size`` (entries) and the RFC 9162 ``root`` over them."""

    origin: str
    size: int
    root: bytes

    def __post_init__(self) -> None:
        if not valid_name(self.origin) or len(self.origin.encode("utf-8")) > MAX_ORIGIN_BYTES:
            raise FormatError(f"tree head origin {self.origin[:80]!r} is not a valid key name")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 0 <= self.size <= MAX_SIZE:
            raise FormatError("tree head size is not an integer in [0, 2^64)")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise FormatError("tree head root is not 32 bytes")

    def text(self) -> bytes:
        """The checkpoint note text (the signed bytes): origin, size, base64 root, each + LF."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n".encode()


@dataclass(frozen=True, slots=True)
class SignatureLine:
    """One signature line of a note: key name, 4-byte key hash, signature bytes."""

    name: str
    key_hash: bytes
    signature: bytes


def _b64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise FormatError(f"{what} is not standard base64") from None
    if base64.b64encode(raw).decode() != text:
        raise FormatError(f"{what} is not canonical base64")
    return raw


def split_note(data: bytes) -> tuple[bytes, list[SignatureLine]]:
    """Split a signed note into its text (ending in LF) and its signature lines (C2SP rules:
    UTF-8, no control characters but LF, text and signatures separated by the last blank line,
    every signature line ``— name base64``). :class:`FormatError` on anything else."""
    if not isinstance(data, (bytes, bytearray)):
        raise FormatError("a note is bytes")
    if len(data) > MAX_NOTE_BYTES:
        raise FormatError(f"note is {len(data)} bytes, more than the {MAX_NOTE_BYTES} allowed")
    try:
        decoded = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("note is not valid UTF-8") from None
    if any(ord(ch) < 0x20 and ch != "\n" for ch in decoded):
        raise FormatError("note holds a control character other than newline")
    split = data.rfind(b"\n\n")
    if split < 0:
        raise FormatError("note has no blank line before its signatures")
    text, sigs = bytes(data[:split + 1]), bytes(data[split + 2:])
    if not sigs or not sigs.endswith(b"\n"):
        raise FormatError("note has no signature lines, or they do not end with a newline")
    lines = sigs[:-1].split(b"\n")
    if len(lines) > MAX_SIGNATURES:
        raise FormatError(f"note has more than {MAX_SIGNATURES} signature lines")
    out = []
    for line in lines:
        if not line.startswith(_DASH):
            raise FormatError("a note signature line does not start with an em dash and a space")
        name, sep, b64 = line[len(_DASH):].decode("utf-8").partition(" ")
        if not sep or not valid_name(name) or not b64:
            raise FormatError("a note signature line has no valid key name and signature")
        raw = _b64(b64, "a note signature")
        if len(raw) < 5:
            raise FormatError("a note signature is shorter than its key hash")
        out.append(SignatureLine(name, raw[:4], raw[4:]))
    return text, out


def parse_checkpoint(text: bytes) -> TreeHead:
    """The tree head a checkpoint note text states: origin, decimal size without leading zeros,
    canonical base64 of a 32-byte root, nothing after (no extension lines are used here)."""
    if not text.endswith(b"\n"):
        raise FormatError("checkpoint text does not end with a newline")
    try:
        lines = text[:-1].decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise FormatError("checkpoint text is not valid UTF-8") from None
    if len(lines) != 3:
        raise FormatError(f"checkpoint text has {len(lines)} lines, not origin, size and root")
    origin, size_text, root_text = lines
    if not size_text.isascii() or not size_text.isdigit() or (len(size_text) > 1 and size_text[0] == "0") \
            or len(size_text) > 20:
        raise FormatError(f"checkpoint size {size_text[:24]!r} is not a decimal number without leading zeros")
    return TreeHead(origin, int(size_text), _b64(root_text, "checkpoint root"))


def sign_note(head: TreeHead, signer: Signer) -> bytes:
    """The signed note of ``head``: its text, a blank line, one signature line by ``signer``
    under the key name ``head.origin``."""
    return note_from_signature(head, signer.public.raw, signer.sign_bytes(head.text()))


def open_note(data: bytes, public_raw: bytes | None) -> tuple[TreeHead, bool]:
    """Parse a signed tree head strictly; return the head and whether it is signed by
    ``public_raw`` under the name ``origin``: exactly one such line (name and key hash), and it
    verifies. :class:`FormatError` on bad bytes, and on a note with more than one line by that key
    (so a note costs at most one signature check)."""
    text, lines = split_note(data)
    head = parse_checkpoint(text)
    if public_raw is None:
        return head, False
    want = key_hash(head.origin, public_raw)
    ours = [line for line in lines if line.name == head.origin and line.key_hash == want]
    if len(ours) > 1:
        raise FormatError(f"note has {len(ours)} signature lines by the same key; a key signs a note once")
    verified = bool(ours) and len(ours[0].signature) == SIGNATURE_SIZE and \
        verify_bytes(public_raw, text, ours[0].signature)
    return head, verified


def note_signature(data: bytes, public_raw: bytes) -> bytes | None:
    """The 64-byte signature a note carries by ``public_raw`` under its origin, or None."""
    text, lines = split_note(data)
    head = parse_checkpoint(text)
    want = key_hash(head.origin, public_raw)
    return next((line.signature for line in lines if line.name == head.origin and line.key_hash == want
                 and len(line.signature) == SIGNATURE_SIZE), None)


def note_from_signature(head: TreeHead, public_raw: bytes, signature: bytes) -> bytes:
    """Rebuild the signed note of ``head`` from a bare 64-byte signature (as a checkpoint entry's
    ``tree_head`` stores it): the same bytes :func:`sign_note` wrote."""
    blob = key_hash(head.origin, public_raw) + bytes(signature)
    return head.text() + b"\n" + _DASH + head.origin.encode() + b" " + base64.b64encode(blob) + b"\n"


__all__ = ["MAX_NOTE_BYTES", "SignatureLine", "TreeHead", "key_hash", "note_from_signature", "note_signature",
           "open_note", "origin_of", "parse_checkpoint", "sign_note", "split_note", "valid_name", "verifier_key"]
