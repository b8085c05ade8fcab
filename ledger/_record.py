"""Record bytes, entry hashes, DSSE pre-authentication encoding and RFC 9162 Merkle math.

Pure functions on bytes; the normative description is docs/FORMAT.md §2–§5.

Record bytes = 92-byte header ‖ deterministic-CBOR body. Header, all integers big-endian:

====== ====== ==========================================================
offset size   field
====== ====== ==========================================================
0      2      format version (u16, currently 1)
2      1      kind (u8, see :class:`Kind`)
3      1      reserved, must be 0
4      8      seq (u64, 0-based, contiguous)
12     8      step (i64, signed; the init state is −1)
20     8      time_ns (i64, nanoseconds since the Unix epoch, UTC)
28     32     run-id digest: SHA-256 of the run id's UTF-8 bytes
60     32     prev_hash: entry hash of seq−1 (32 zero bytes for genesis)
====== ====== ==========================================================
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from ledger.errors import ConfigurationError, FormatError

FORMAT_VERSION = 1
PAYLOAD_TYPE = "application/vnd.training-ledger.record.v1"
# (field, struct code) in order; big-endian. HEADER and HEADER_OFFSETS derive from this one table.
HEADER_LAYOUT = (("version", "H"), ("kind", "B"), ("reserved", "B"), ("seq", "Q"), ("step", "q"),
                 ("time_ns", "q"), ("run_digest", "32s"), ("prev_hash", "32s"))
HEADER = struct.Struct(">" + "".join(code for _, code in HEADER_LAYOUT))
HEADER_SIZE = HEADER.size  # 92
HEADER_OFFSETS: dict[str, tuple[int, int]] = {
    name: (struct.calcsize(">" + "".join(c for _, c in HEADER_LAYOUT[:i])), struct.calcsize(">" + code))
    for i, (name, code) in enumerate(HEADER_LAYOUT)
}  # field → (offset, size)
HASH_SIZE = 32
SIGNATURE_SIZE = 64
ZERO_HASH = bytes(HASH_SIZE)
MAX_RECORD_BYTES = 64 << 20  # docs/FORMAT.md §2: a record (header ‖ body) is at most 64 MiB


class Kind(enum.IntEnum):
    """Entry kinds; the numeric value is what the header carries."""

    GENESIS = 0
    STEP = 1
    CHECKPOINT = 2
    RESUME = 3
    EVAL = 4
    PRUNE = 5
    SEAL = 6

    @property
    def label(self) -> str:
        """The lowercase name used in Parquet, JSON and the CLI."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: int | str | Kind) -> Kind:
        """Accept a Kind, its number or its lowercase name."""
        if isinstance(value, Kind):
            return value
        try:
            return cls[value.upper()] if isinstance(value, str) else cls(value)
        except (KeyError, ValueError):
            raise FormatError(f"unknown entry kind {value!r}") from None


@dataclass(frozen=True, slots=True)
class Header:
    """The decoded fixed-layout header of a record."""

    version: int
    kind: Kind
    seq: int
    step: int
    time_ns: int
    run_digest: bytes
    prev_hash: bytes


def run_digest(run_id: str) -> bytes:
    """SHA-256 of the run id's UTF-8 bytes, as carried in every header."""
    return hashlib.sha256(run_id.encode("utf-8")).digest()


def encode_header(header: Header) -> bytes:
    """Pack a header into its 92 bytes."""
    if len(header.run_digest) != HASH_SIZE or len(header.prev_hash) != HASH_SIZE:
        raise FormatError("run digest and prev_hash must be 32 bytes")
    if header.seq < 0:
        raise FormatError("seq must be non-negative")
    try:
        return HEADER.pack(header.version, int(header.kind), 0, header.seq, header.step,
                           header.time_ns, header.run_digest, header.prev_hash)
    except struct.error as exc:
        raise FormatError(f"header field out of range: {exc}") from exc


def decode_header(record: bytes) -> Header:
    """Unpack the header at the start of ``record``; refuses unknown versions and kinds, and
    records longer than :data:`MAX_RECORD_BYTES`."""
    if not isinstance(record, (bytes, bytearray, memoryview)):
        raise FormatError(f"a record is bytes, not a {type(record).__name__}")
    if len(record) > MAX_RECORD_BYTES:
        raise FormatError(f"record is {len(record)} bytes, more than the {MAX_RECORD_BYTES >> 20} MiB a record "
                          "may have")
    if len(record) < HEADER_SIZE:
        raise FormatError(f"record is {len(record)} bytes, shorter than the {HEADER_SIZE}-byte header")
    version, kind, reserved, seq, step, time_ns, rd, prev = HEADER.unpack_from(record)
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported format version {version} (this reader knows {FORMAT_VERSION})")
    if reserved != 0:
        raise FormatError("reserved header byte is not zero")
    return Header(version, Kind.parse(kind), seq, step, time_ns, rd, prev)


def encode_record(header: Header, body: bytes) -> bytes:
    """Record bytes: header followed by the (already encoded) body (at most
    :data:`MAX_RECORD_BYTES` in all)."""
    if HEADER_SIZE + len(body) > MAX_RECORD_BYTES:
        raise ConfigurationError(f"a record of {HEADER_SIZE + len(body)} bytes is larger than the "
                          f"{MAX_RECORD_BYTES >> 20} MiB a record may have")
    return encode_header(header) + body


def entry_hash(record: bytes) -> bytes:
    """The RFC 9162 leaf hash of a record: SHA-256(0x00 ‖ record)."""
    return hashlib.sha256(b"\x00" + record).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 9162 interior node hash: SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 Merkle Tree Hash over already-hashed leaves (MTH of the empty list
    is SHA-256 of the empty string)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    sha, level = hashlib.sha256, list(leaves)
    # Pairing left to right and carrying an odd last node up unchanged builds the same tree as
    # RFC 9162's split at the largest power of two below n (tests compare with the recursive form
    # and with MerkleAccumulator, the incremental form the writer uses).
    while len(level) > 1:
        paired = [sha(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


class MerkleAccumulator:
    """Incremental RFC 9162 tree hash: keeps the roots of the perfect subtrees (O(log n))."""

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self.size = 0

    def add(self, leaf: bytes) -> None:
        """Append one leaf hash."""
        node = (1, leaf)
        while self._stack and self._stack[-1][0] == node[0]:
            size, left = self._stack.pop()
            node = (size * 2, node_hash(left, node[1]))
        self._stack.append(node)
        self.size += 1

    def root(self) -> bytes:
        """The Merkle Tree Hash of the leaves so far."""
        if not self._stack:
            return hashlib.sha256(b"").digest()
        acc = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            acc = node_hash(left, acc)
        return acc


_PAE_PREFIX = b"DSSEv1 %d %s " % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode())


def pae(record: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of a record under our payload type:
    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` (lengths in ASCII decimal)."""
    return _PAE_PREFIX + b"%d " % len(record) + record
