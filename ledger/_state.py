"""The checkpoint format: a full training state in files that load without unpickling.

A checkpoint is a directory named by its state digest (docs/FORMAT.md §11):

- ``model.safetensors``: the model's canonical tensors (tied weights once);
- ``optimizer.safetensors``: every tensor of the optimizer state, named ``state/<param index>/<key>``;
- ``state.cbor``: deterministic CBOR with the step, the optimizer's param groups and non-tensor
  state, the scheduler's state and the RNG states (torch CPU/CUDA, python, numpy).

``state digest = SHA-256(domain ‖ model digest ‖ optimizer-tensors digest ‖ SHA-256(state.cbor))``.
Reading and hashing here need no torch (arrays come back as numpy); writing a checkpoint from live
objects and restoring one into them is :mod:`ledger.torch`'s.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy.typing as npt

from ledger._encoding import decode_body
from ledger._fingerprint import model_digest, safetensors_digests
from ledger._io import file_kind, read_regular
from ledger.errors import FormatError

STATE_DOMAIN = b"training-ledger/state/v1\x00"
FILES = ("model.safetensors", "optimizer.safetensors", "state.cbor")
MAX_META_BYTES = 64 << 20  # state.cbor, like a record, is at most 64 MiB


@dataclass(frozen=True, slots=True)
class StateDigests:
    """Digests of a written (or re-read) checkpoint."""

    model: dict[str, bytes]
    model_digest: bytes
    optimizer_digest: bytes
    meta_digest: bytes
    state_digest: bytes


def state_digest(model_d: bytes, optimizer_d: bytes, meta_d: bytes) -> bytes:
    """SHA-256(domain ‖ model digest ‖ optimizer-tensors digest ‖ SHA-256(state.cbor))."""
    return hashlib.sha256(STATE_DOMAIN + model_d + optimizer_d + meta_d).digest()


def checkpoint_file(directory: Path, name: str) -> Path:
    """``directory/name`` when it is a regular file and not a symlink (the recorder writes real
    files; a symlink could make a verifier read, and report on, a file elsewhere on its machine);
    FormatError naming the checkpoint otherwise. Nothing is opened."""
    path = directory / name
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise FormatError(f"checkpoint {directory.name} lacks {name}") from None
    except OSError as exc:
        raise FormatError(f"checkpoint {directory.name}: {name} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise FormatError(f"checkpoint {directory.name}: {name} is {file_kind(info.st_mode)}; checkpoint files "
                          "must be the regular files the recorder wrote")
    return path


def check_files(directory: Path) -> None:
    """FormatError unless every file of the checkpoint is a regular file, not a symlink."""
    for name in FILES:
        checkpoint_file(directory, name)


def _meta_bytes(directory: Path) -> bytes:
    try:
        return read_regular(checkpoint_file(directory, FILES[2]), what=f"checkpoint {directory.name}: {FILES[2]}",
                            limit=MAX_META_BYTES)
    except FileNotFoundError:  # removed between the check and the read
        raise FormatError(f"checkpoint {directory.name} lacks {FILES[2]}") from None


def digests_of(directory: Path) -> StateDigests:
    """Recompute the digests of a checkpoint directory from its files."""
    check_files(directory)
    model_d = safetensors_digests(directory / FILES[0])
    opt_d = safetensors_digests(directory / FILES[1])
    meta_d = hashlib.sha256(_meta_bytes(directory)).digest()
    md, od = model_digest(model_d), model_digest(opt_d)
    return StateDigests(model_d, md, od, meta_d, state_digest(md, od, meta_d))


def read_meta(directory: Path) -> dict[str, Any]:
    """The decoded ``state.cbor`` of a checkpoint."""
    return decode_body(_meta_bytes(directory))


def read_weights(directory: Path) -> dict[str, npt.NDArray[Any]]:
    """The model tensors of a checkpoint as numpy arrays (bf16 widened to float32), no torch."""
    from ledger._weights import read_safetensors

    return read_safetensors(checkpoint_file(directory, FILES[0]))


__all__ = ["FILES", "StateDigests", "check_files", "checkpoint_file", "digests_of", "read_meta", "read_weights",
           "state_digest"]
