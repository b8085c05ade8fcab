"""A decoded view of a recorded run: genesis, the step entries that count, checkpoints, prunes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger._encoding import decode_body
from ledger._record import HEADER_SIZE, Kind, decode_header
from ledger.errors import FormatError
from ledger.verify._integrity import Loaded


@dataclass
class Checkpoint:
    """A checkpoint entry and where its files are."""

    seq: int
    step: int
    body: dict[str, Any]
    directory: Path
    pruned: bool = False


@dataclass
class RunView:
    """What the provenance checks read from a ledger (superseded step entries excluded)."""

    genesis: dict[str, Any]
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    superseded: list[tuple[int, int]] = field(default_factory=list)  # (seq, step) of superseded step entries
    seal: dict[str, Any] | None = None

    @property
    def recorded(self) -> bool:
        """True when genesis comes from the recorder (has the fingerprint policy and init)."""
        return isinstance(self.genesis.get("fingerprints"), dict) and isinstance(self.genesis.get("init"), dict)

    @property
    def tensor_order(self) -> list[str]:
        """Names of the fingerprinted tensors, in the order of per-tensor arrays."""
        return list(self.genesis["fingerprints"]["tensor_order"])

    @property
    def last_step(self) -> int:
        """The highest recorded step (−1 when none)."""
        return max(self.steps, default=-1)


def build(loaded: Loaded, ledger_root: Path, checkpoint_dir: Path | None) -> RunView:
    """Decode every entry the provenance checks need."""
    records = loaded.records.materialize()
    headers = [decode_header(r) for r in records]
    resumes = [(h.seq, decode_body(r[HEADER_SIZE:])) for h, r in zip(headers, records, strict=True)
               if h.kind is Kind.RESUME]
    superseded_seqs: set[int] = set()
    for _, body in resumes:
        span = body.get("superseded")
        if isinstance(span, dict):
            superseded_seqs.update(range(int(span["first_seq"]), int(span["last_seq"]) + 1))
    view = RunView(genesis=loaded.genesis or {})
    pruned: set[bytes] = set()
    for header, record in zip(headers, records, strict=True):
        if header.kind in (Kind.STEP, Kind.CHECKPOINT, Kind.PRUNE, Kind.SEAL):
            try:
                body = decode_body(record[HEADER_SIZE:])
            except FormatError:
                continue  # the chain check reports undecodable bodies
        else:
            continue
        if header.kind is Kind.STEP:
            if header.seq in superseded_seqs:
                view.superseded.append((header.seq, header.step))
            else:
                view.steps[header.step] = body
        elif header.kind is Kind.CHECKPOINT:
            stored = Path(str(body.get("path", "")))
            digest = body.get("state_digest", b"")
            if checkpoint_dir is not None:
                directory = checkpoint_dir / (digest.hex() if isinstance(digest, bytes) else "?")
            else:
                directory = stored if stored.is_absolute() else ledger_root / stored
            view.checkpoints.append(Checkpoint(header.seq, header.step, body, directory))
        elif header.kind is Kind.PRUNE and isinstance(body.get("state_digest"), bytes):
            pruned.add(body["state_digest"])
        elif header.kind is Kind.SEAL:
            view.seal = body
    for checkpoint in view.checkpoints:
        checkpoint.pruned = checkpoint.body.get("state_digest") in pruned
    return view
