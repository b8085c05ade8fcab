"""Ed25519 verification of many entries, spread across processes."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

from ledger._crypto import verify_many

Progress = Callable[[int, int], None]

# Records and signatures live here in the parent before the pool forks, so workers receive
# only index ranges and nothing is pickled.
_SHARED: tuple[bytes, Sequence[bytes], Sequence[bytes]] | None = None
_INLINE_BELOW = 2048


def _work(bounds: tuple[int, int]) -> list[int]:
    assert _SHARED is not None
    public_raw, records, signatures = _SHARED
    lo, hi = bounds
    return [lo + i for i in verify_many(public_raw, list(records[lo:hi]), list(signatures[lo:hi]))]


def bad_signatures(public_raw: bytes, records: Sequence[bytes], signatures: Sequence[bytes], *,
                   workers: int | None = None, progress: Progress | None = None) -> list[int]:
    """Indices whose signature does not verify, checked on all cores (fork) when worthwhile."""
    global _SHARED
    n = len(records)
    workers = workers or os.cpu_count() or 1
    methods = multiprocessing.get_all_start_methods()
    if n < _INLINE_BELOW or workers == 1 or "fork" not in methods:
        inline = verify_many(public_raw, list(records), list(signatures))
        if progress:
            progress(n, n)
        return inline
    chunk = max(512, min(4096, n // (workers * 8) or 1))  # the last chunks leave a worker idle at most ~0.4 s
    bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    _SHARED = (public_raw, records, signatures)
    bad: list[int] = []
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            done = 0
            for (lo, hi), result in zip(bounds, pool.map(_work, bounds), strict=True):
                bad.extend(result)
                done += hi - lo
                if progress:
                    progress(done, n)
    finally:
        _SHARED = None
    return sorted(bad)
