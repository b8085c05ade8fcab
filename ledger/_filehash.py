"""SHA-256 of byte ranges of open files, in parallel threads and bounded chunks.

What :func:`ledger._fingerprint.safetensors_digests` hashes a release's weights with: each range is
``SHA-256(prefix ‖ file[begin:end])``, read with ``preadv`` into a buffer each thread owns (never a
memory map, whose pages would count towards the process's resident memory), so memory stays
``threads × chunk`` whatever the file size. hashlib and ``preadv`` release the GIL, so ranges hash
on all cores at once; one range is one hash and stays on one thread (the digest is sequential).
Ranges smaller than a chunk that lie back to back are read together and hashed from one buffer.
A range may instead be hashed in blocks (``tensor-blocked/v1``): one SHA-256 of ``prefix ‖ block``
per block of a fixed size, their digests concatenated.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ledger.errors import FormatError

CHUNK = 4 << 20  # bytes read and hashed at a time, per thread
MAX_THREADS = 32  # so buffers stay ≤ 128 MiB on any machine


@dataclass(frozen=True, slots=True)
class Span:
    """One digest to compute: SHA-256 of ``prefix`` then bytes ``[begin, end)`` of the file; with
    ``block`` > 0, the concatenated SHA-256 of ``prefix`` then each ``block`` bytes of the range in
    turn (the last block may be short)."""

    key: str
    prefix: bytes
    begin: int
    end: int
    block: int = 0


class Cancelled(Exception):
    """The hashing was cancelled (:func:`hash_spans` ``cancel``) before it finished."""


@dataclass(frozen=True, slots=True)
class OpenFile:
    """A file open for reading (``fd``, its ``path`` for messages) and the spans to hash in it."""

    fd: int
    path: Path
    spans: Sequence[Span]


def threads() -> int:
    """Threads the hashing uses: the CPUs this process may run on, at most :data:`MAX_THREADS`."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    return max(1, min(count, MAX_THREADS))


_local = threading.local()


def _buffer(size: int) -> memoryview:
    buf = getattr(_local, "buffer", None)
    if buf is None or len(buf) < size:
        buf = _local.buffer = bytearray(size)
    return memoryview(buf)[:size]


def read_exact(fd: int, path: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the bytes of the open file ``fd`` from ``offset`` on; a file that ends
    first (cut while it is read) or cannot be read raises FormatError naming ``path``."""
    got, size = 0, len(view)
    while got < size:
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as exc:
            raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None
        if n == 0:
            raise FormatError(f"{path} ends at byte {offset + got}, before the {offset + size} its header "
                              "says it holds (truncated while it was read?)")
        got += n


def _read(file: OpenFile, offset: int, size: int, cancel: threading.Event | None) -> memoryview:
    if cancel is not None and cancel.is_set():
        raise Cancelled
    view = _buffer(size)
    read_exact(file.fd, file.path, offset, view)
    return view


def hash_blocks(prefix: bytes, data: memoryview, block: int) -> bytes:
    """The concatenated SHA-256 of ``prefix`` then each ``block`` bytes of ``data`` in turn (the
    last block may be short)."""
    start = hashlib.sha256(prefix)
    out = []
    for offset in range(0, len(data), block):
        h = start.copy()
        h.update(data[offset:offset + block])
        out.append(h.digest())
    return b"".join(out)


def _hash_one(file: OpenFile, span: Span, chunk: int, cancel: threading.Event | None) -> tuple[str, bytes]:
    if span.block:  # whole blocks per read
        step = max(span.block, chunk - chunk % span.block)
        return span.key, b"".join(hash_blocks(span.prefix, _read(file, offset, min(step, span.end - offset), cancel),
                                          span.block) for offset in range(span.begin, span.end, step))
    h = hashlib.sha256(span.prefix)
    for offset in range(span.begin, span.end, chunk):
        h.update(_read(file, offset, min(chunk, span.end - offset), cancel))
    return span.key, h.digest()


def _hash_run(file: OpenFile, run: Sequence[Span], cancel: threading.Event | None) -> list[tuple[str, bytes]]:
    base = run[0].begin
    data = _read(file, base, run[-1].end - base, cancel)
    out = []
    for s in run:
        view = data[s.begin - base:s.end - base]
        if s.block:
            out.append((s.key, hash_blocks(s.prefix, view, s.block)))
            continue
        h = hashlib.sha256(s.prefix)
        h.update(view)
        out.append((s.key, h.digest()))
    return out


def _tasks(file: OpenFile, chunk: int) -> list[tuple[int, list[Span]]]:
    """Big spans alone; small back-to-back spans in runs of at most ``chunk`` bytes. With size."""
    tasks: list[tuple[int, list[Span]]] = []
    run: list[Span] = []
    for span in sorted(file.spans, key=lambda s: (s.begin, s.end)):
        size = span.end - span.begin
        if size > chunk:
            tasks.append((size, [span]))
            continue
        if run and (run[-1].end != span.begin or span.end - run[0].begin > chunk):
            tasks.append((run[-1].end - run[0].begin, run))
            run = []
        run.append(span)
    if run:
        tasks.append((run[-1].end - run[0].begin, run))
    return tasks


def _work(file: OpenFile, spans: list[Span], chunk: int, cancel: threading.Event | None) -> list[tuple[str, bytes]]:
    if len(spans) == 1 and spans[0].end - spans[0].begin > chunk:
        return [_hash_one(file, spans[0], chunk, cancel)]
    return _hash_run(file, spans, cancel)


def hash_spans(files: Sequence[OpenFile], *, workers: int | None = None, chunk: int = CHUNK,
               cancel: threading.Event | None = None) -> dict[str, bytes]:
    """The digest of every span of every file, keyed by :attr:`Span.key`. Largest work first over
    ``workers`` threads (default :func:`threads`); a file shorter than a span raises FormatError.
    Once ``cancel`` is set, every thread stops before its next read and :class:`Cancelled` is raised."""
    if chunk < 1:
        raise ValueError("chunk must be positive")
    tasks = [(size, file, spans) for file in files for size, spans in _tasks(file, chunk)]
    tasks.sort(key=lambda t: -t[0])
    workers = min(workers or threads(), max(1, len(tasks)))
    out: dict[str, bytes] = {}
    if workers == 1:
        for _, file, spans in tasks:
            out.update(_work(file, spans, chunk, cancel))
        return out
    pool = ThreadPoolExecutor(workers, thread_name_prefix="ledger-hash")
    try:
        futures = [pool.submit(_work, file, spans, chunk, cancel) for _, file, spans in tasks]
        for future in futures:
            out.update(future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


__all__ = ["CHUNK", "Cancelled", "OpenFile", "Span", "hash_blocks", "hash_spans", "read_exact", "threads"]
