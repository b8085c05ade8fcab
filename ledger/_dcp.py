"""Manifests of checkpoint directories other tools write (docs/FORMAT.md §11.1): layout ``"dcp"``,
a ``torch.distributed.checkpoint`` directory; layout ``"files"``, any directory one process wrote
(a Hugging Face Trainer ``checkpoint-N/``, subdirectories included).

DCP writes one directory per checkpoint: ``__<rank>_<n>.distcp`` files (each rank writes its own)
and a ``.metadata`` file (the coordinator's), with no digest of its own. The recorder records a
signed manifest of those files — name, size, SHA-256 and the rank that hashed it — in a checkpoint
entry of layout ``"dcp"``; its ``state_digest`` is the digest of the manifest. ``ledger verify
--checkpoints DIR`` checks a DCP directory against it. No torch here: hashing and comparing files.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ledger._encoding import encode_body
from ledger._io import open_regular
from ledger.errors import FormatError

DOMAIN = b"training-ledger/dcp-manifest/v1\x00"
RANK_FILE = re.compile(r"^__(\d+)_(\d+)\.distcp$")
METADATA = ".metadata"
MAX_FILES = 1 << 16
_READ = 1 << 22


def file_digest(path: Path, limit: int | None = None) -> dict[str, Any]:
    """``{"size", "sha256"}`` of one regular file (not a symlink, not a FIFO), read in 4 MiB pieces;
    with ``limit``, at most ``limit`` + 1 bytes are read (a /proc file says size 0 and never ends)."""
    if stat.S_ISLNK(os.lstat(path).st_mode):
        raise FormatError(f"{path} is a symbolic link; a DCP checkpoint file must be a regular file")
    h, size = hashlib.sha256(), 0
    with open_regular(path, what="DCP checkpoint file") as handle:
        while piece := handle.read(_READ if limit is None else min(_READ, limit + 1 - size)):
            h.update(piece)
            size += len(piece)
            if limit is not None and size > limit:
                break
    return {"size": size, "sha256": h.digest()}


def rank_files(directory: Path, rank: int, *, coordinator: bool) -> dict[str, dict[str, Any]]:
    """The files of a DCP directory one rank vouches for: those it wrote (``__<rank>_*.distcp``) and,
    on the coordinator, every other file (``.metadata``, and anything not named after a rank)."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(os.listdir(directory)):
        match = RANK_FILE.match(name)
        if (match is not None and int(match.group(1)) == rank) or (match is None and coordinator):
            if len(out) >= MAX_FILES:
                raise FormatError(f"{directory} holds more than {MAX_FILES} files; not a DCP checkpoint")
            out[name] = {**file_digest(directory / name), "rank": rank}
    return out


MAX_DEPTH = 8


def tree_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Every regular file under ``directory`` (layout ``"files"``), by its relative POSIX path, hashed
    by this process (``rank`` 0); symlinks and other special files are refused, not followed."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(_walk(directory, directory, 0)):
        if len(out) >= MAX_FILES:
            raise FormatError(f"{directory} holds more than {MAX_FILES} files")
        out[path.relative_to(directory).as_posix()] = {**file_digest(path), "rank": 0}
    if not out:
        raise FormatError(f"{directory} holds no file")
    return out


def _walk(root: Path, directory: Path, depth: int) -> list[Path]:
    """Regular files under ``directory`` (no symlink followed; deeper than MAX_DEPTH refused)."""
    if depth > MAX_DEPTH:
        raise FormatError(f"{root} nests directories more than {MAX_DEPTH} deep")
    found: list[Path] = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            found += _walk(root, Path(entry.path), depth + 1)
        elif entry.is_file(follow_symlinks=False):
            found.append(Path(entry.path))
        else:
            raise FormatError(f"{entry.path} is not a regular file or directory (a symlink?); not recorded")
    return found


def manifest_digest(files: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The digest a DCP checkpoint entry's ``state_digest`` holds: SHA-256 over the domain and the
    deterministic CBOR of the manifest ({name: {size, sha256, rank}})."""
    return hashlib.sha256(DOMAIN + encode_body({"files": {n: dict(f) for n, f in files.items()}})).digest()


def check_files(value: Any, nested: bool = False) -> dict[str, dict[str, Any]]:
    """A manifest read from an entry: file names (flat for ``"dcp"``; relative POSIX paths, no ``..``,
    for ``"files"``: ``nested``), sizes, 32-byte digests and ranks (FormatError)."""
    if not isinstance(value, Mapping) or not 1 <= len(value) <= MAX_FILES:
        raise FormatError("checkpoint 'files' is not a map of 1 to 65536 files")
    files: dict[str, dict[str, Any]] = {}
    for name, info in value.items():
        parts = name.split("/") if isinstance(name, str) else [""]
        if not isinstance(name, str) or "\x00" in name or (len(parts) > 1 and not nested) \
                or len(parts) > MAX_DEPTH + 1 or any(p in ("", ".", "..") for p in parts):
            raise FormatError(f"checkpoint 'files' names {str(name)[:60]!r}, not a file name")
        if not isinstance(info, Mapping) or set(info) != {"size", "sha256", "rank"} \
                or not all(isinstance(info[k], int) and not isinstance(info[k], bool) and 0 <= info[k] < 1 << 62
                           for k in ("size", "rank")) \
                or not isinstance(info["sha256"], bytes) or len(info["sha256"]) != 32:
            raise FormatError(f"checkpoint 'files' entry {name[:60]!r} is not {{size, sha256, rank}}")
        files[name] = {"size": info["size"], "sha256": info["sha256"], "rank": info["rank"]}
    return files


def compare(directory: Path, files: Mapping[str, Mapping[str, Any]], nested: bool = False) -> list[str]:
    """What differs between a directory and its manifest (empty: every file is there with its digest
    and nothing was added): missing and changed files, and unrecorded ones — ``.distcp`` files of a DCP
    directory, any file of a ``"files"`` one (``nested``). No symlink is followed."""
    problems: list[str] = []
    for name, want in sorted(files.items()):
        path = directory / name
        if any(p.is_symlink() for p in list(path.parents)[: name.count("/")]):
            problems.append(f"{name} is unreadable (under a symbolic link)")
            continue
        if not os.path.lexists(path):
            problems.append(f"{name} is missing")
            continue
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{name} is unreadable (not a regular file)")
                continue
            # never read more than the recorded size + 1: a crafted path may name a huge or endless file
            found = file_digest(path, want["size"]) if st.st_size == want["size"] else {"size": -1}
        except (FormatError, OSError) as exc:
            problems.append(f"{name} is unreadable ({exc})")
            continue
        if found["size"] != want["size"] or found["sha256"] != want["sha256"]:
            problems.append(f"{name} differs (written by rank {want['rank']})")
    if nested:
        try:
            present = [p.relative_to(directory).as_posix() for p in _walk(directory, directory, 0)]
        except (FormatError, OSError) as exc:
            return [*problems, f"the directory cannot be listed ({exc})"]
        extra = sorted(n for n in present if n not in files)
    else:
        extra = sorted(n for n in os.listdir(directory) if RANK_FILE.match(n) and n not in files)
    if extra:  # counted, not named: the names of files nobody recorded are not the ledger's to print
        problems.append(f"{len(extra)} file{'s' if len(extra) > 1 else ''} the manifest does not list")
    return problems


def is_dcp(directory: Path) -> bool:
    """True when ``directory`` looks like a DCP checkpoint (it holds ``.metadata``)."""
    return (directory / METADATA).is_file()
