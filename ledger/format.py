"""The format's primitives, for second implementations and tools (docs/FORMAT.md).

Pure functions on bytes: record headers, deterministic CBOR bodies, entry hashes, DSSE
pre-authentication encoding, RFC 9162 Merkle tree hashes, tensor and model digests (``tensor/v1``, and
``tensor-blocked/v1`` for sharded runs), DCP and file-tree manifest digests, and the typed entry bodies
the recorder writes. Everyday use needs none of this: see :mod:`ledger`.
"""

from __future__ import annotations

from ledger._blocked import blocked_digest, safetensors_blocked_digests
from ledger._dcp import manifest_digest
from ledger._encoding import decode_body, encode_body
from ledger._fingerprint import model_digest, safetensors_digests, tensor_digest
from ledger._record import (
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    PAYLOAD_TYPE,
    Header,
    Kind,
    MerkleAccumulator,
    decode_header,
    encode_header,
    encode_record,
    entry_hash,
    merkle_root,
    node_hash,
    pae,
)
from ledger._schema import (
    CheckpointBody,
    FinalWeights,
    FingerprintPolicy,
    Genesis,
    InitFingerprint,
    OptimizerInfo,
    PruneBody,
    ResumeBody,
    SealBody,
    StepBody,
)

__all__ = [
    "FORMAT_VERSION", "HEADER", "HEADER_SIZE", "PAYLOAD_TYPE", "CheckpointBody", "FinalWeights", "FingerprintPolicy",
    "Genesis", "Header", "InitFingerprint", "Kind", "MerkleAccumulator", "OptimizerInfo", "PruneBody", "ResumeBody",
    "SealBody", "StepBody", "blocked_digest", "decode_body", "decode_header", "encode_body", "encode_header",
    "encode_record", "entry_hash", "manifest_digest", "merkle_root", "model_digest", "node_hash", "pae",
    "safetensors_blocked_digests", "safetensors_digests", "tensor_digest",
]
