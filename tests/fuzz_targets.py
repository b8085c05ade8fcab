"""Fuzz targets for the format readers: each takes arbitrary bytes and may raise only FormatError.

Run under atheris by tests/test_fuzz.py (``python tests/fuzz_targets.py TARGET [libFuzzer flags]``);
the same functions replay the regression inputs in tests/fuzz_corpus/<target>/.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="ledger-fuzz-"))


def _record(data: bytes) -> None:
    from ledger._encoding import decode_body
    from ledger._entry import Entry
    from ledger._record import HEADER_SIZE, decode_header

    entry = Entry(record=data, signature=b"", key_id=b"")
    try:
        header = decode_header(data)
    finally:  # the body is decoded even when the header is refused: both must only raise FormatError
        if len(data) >= HEADER_SIZE:
            decode_body(data[HEADER_SIZE:])
    assert entry.seq == header.seq


def _wal(data: bytes) -> None:
    from ledger._wal import scan

    for entry in scan(data).entries:
        entry.header  # noqa: B018 - decoding is the point
        entry.body()


def _safetensors(data: bytes) -> None:
    from ledger._fingerprint import safetensors_digests
    from ledger._weights import read_safetensors

    path = _SCRATCH / "model.safetensors"
    path.write_bytes(data)
    safetensors_digests(path)
    read_safetensors(path)


_KEY = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")  # seed 00…1f (FORMAT §8)


def _note(data: bytes) -> None:
    from ledger._note import open_note

    head, _ = open_note(data, _KEY)
    head.text()


def _proof(data: bytes) -> None:
    from ledger._proofs import InclusionProof, check_consistency, check_inclusion, parse_proof

    proof = parse_proof(data)
    check_inclusion(proof, _KEY) if isinstance(proof, InclusionProof) else check_consistency(proof, _KEY)


TARGETS: dict[str, Callable[[bytes], None]] = {"record": _record, "wal": _wal, "safetensors": _safetensors,
                                               "note": _note, "proof": _proof}


def run_one(target: str, data: bytes) -> None:
    """Run ``target`` on ``data``; a FormatError is the expected way to refuse bytes."""
    from ledger.errors import FormatError

    try:
        TARGETS[target](data)
    except FormatError:
        pass


def cap_memory(extra: int) -> None:
    """Let this process map at most ``extra`` bytes beyond what it maps now (Linux): an input that
    makes a reader allocate more raises MemoryError, a crash libFuzzer reports, whatever peak RSS this
    process inherited from the one that started it (its -rss_limit_mb counts that peak too)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return
    import resource

    size_kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, ((size_kib << 10) + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main() -> None:
    import atheris

    target = sys.argv.pop(1)
    with atheris.instrument_imports(include=["ledger"]):
        import ledger._encoding  # noqa: F401
        import ledger._entry  # noqa: F401
        import ledger._fingerprint  # noqa: F401
        import ledger._merkle  # noqa: F401
        import ledger._note  # noqa: F401
        import ledger._proofs  # noqa: F401
        import ledger._record  # noqa: F401
        import ledger._wal  # noqa: F401
        import ledger._weights  # noqa: F401

    def one_input(data: bytes) -> None:
        run_one(target, data)

    cap_memory(2 << 30)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[1]))
    main()
