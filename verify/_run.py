"""A decoded view of a recorded run: genesis, the step entries that count, checkpoints, prunes."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ledger._blocked import TENSOR_V1, safetensors_digests_as
from ledger._dcp import is_dcp
from ledger._encoding import decode_body
from ledger._record import HEADER_SIZE, Header, Kind
from ledger._schema import (
    CheckpointBody,
    FingerprintPolicy,
    Genesis,
    InitFingerprint,
    OptimizerInfo,
    PruneBody,
    ResumeBody,
    SealBody,
    checkpoint_directory,
)
from ledger.errors import FormatError, LedgerError
from ledger.verify._columns import DECODER_GAPS, StepEntries, Steps, StepsRead, read_steps, step_entries
from ledger.verify._load import Bodies, Loaded, Records, header_field
from ledger.verify._template import Accepted


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint entry and where its files are."""

    seq: int
    step: int
    body: CheckpointBody
    directory: Path
    pruned: bool = False
    superseded: bool = False  # on a branch a later resume abandoned (between its checkpoint and itself)

    @property
    def stored(self) -> bool:
        """Its files are here (not pruned, the directory exists)."""
        return not self.pruned and self.directory.is_dir()


@dataclass
class RunView:
    """What the provenance checks read from a ledger (superseded step entries excluded). Entries
    whose body breaks the schema are left out and listed in ``malformed``: the check that reads
    that kind fails naming them (:meth:`malformed_of`)."""

    genesis: Genesis
    steps: Steps = field(default_factory=Steps.none)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    dcp: list[Checkpoint] = field(default_factory=list)  # torch.distributed.checkpoint manifests (§11.1)
    superseded: list[tuple[int, int]] = field(default_factory=list)  # (seq, step) of superseded step entries
    seal: SealBody | None = None
    malformed: list[tuple[int, Kind, str]] = field(default_factory=list)  # (seq, kind, why)
    # seqs of checkpoints an earlier check could not read: never read again (the registry sets it
    # from a result's ``damaged_seqs``)
    damaged: frozenset[int] = frozenset()
    # the step bodies templates accepted (canonical, of a known shape), by record position, with their
    # metrics: the chain check compares them with the metrics column without decoding them again
    accepted: tuple[Accepted, ...] = ()

    @property
    def recorded(self) -> bool:
        """True when genesis comes from the recorder (has the fingerprint policy and init)."""
        return self.genesis.recorded

    @property
    def tensor_order(self) -> list[str]:
        """Names of the fingerprinted tensors, in the order of per-tensor arrays."""
        return self.genesis.tensor_order

    @property
    def init(self) -> InitFingerprint:
        """The init fingerprint (only on a recorded run)."""
        assert self.genesis.init is not None
        return self.genesis.init

    @property
    def policy(self) -> FingerprintPolicy:
        """The fingerprint policy (only on a recorded run)."""
        assert self.genesis.fingerprints is not None
        return self.genesis.fingerprints

    @property
    def optimizer(self) -> OptimizerInfo:
        """The optimizer and its param groups (only on a recorded run)."""
        assert self.genesis.optimizer is not None
        return self.genesis.optimizer

    @property
    def last_step(self) -> int:
        """The highest recorded step (−1 when none)."""
        return max(self.steps, default=-1)

    def malformed_of(self, *kinds: Kind) -> list[str]:
        """"seq N: why" for each entry of these kinds whose body breaks the schema."""
        return [f"seq {seq}: {why}" for seq, kind, why in self.malformed if kind in kinds]

    @property
    def digest_scheme(self) -> str:
        """The per-tensor digest scheme of the ledger's init, step, base and seal digests (genesis
        ``fingerprints.tensor_digest``; checkpoint entries always use ``tensor/v1``)."""
        return self.genesis.fingerprints.tensor_digest if self.genesis.fingerprints else TENSOR_V1

    def file_digests(self, path: str | Path) -> dict[str, bytes]:
        """Tensor digests of a safetensors file in this ledger's scheme, to compare with its digests."""
        return safetensors_digests_as(path, self.digest_scheme)

    def last_state(self) -> tuple[int, dict[str, bytes] | None, str]:
        """The last recorded step, the full digests of the state after it (in :attr:`digest_scheme`)
        when the ledger holds them (its checkpoint, else the digests its step entry carries), and
        where they come from."""
        last = self.last_step
        checkpoint = next((cp for cp in reversed(self.checkpoints) if cp.step == last and not cp.superseded), None)
        if checkpoint is not None and self.digest_scheme == TENSOR_V1:
            return last, dict(checkpoint.body.tensor_digests), f"the checkpoint at step {last}"
        body = self.steps.get(last)
        if body is not None and body.tensor_digests is not None:
            order = self.tensor_order
            return last, {name: body.tensor_digests[32 * i:32 * (i + 1)] for i, name in enumerate(order)}, \
                f"the digests logged at step {last}"
        if checkpoint is not None and checkpoint.stored and checkpoint.seq not in self.damaged:
            # a checkpoint entry's digests are tensor/v1 of its files: rehash its model file in this
            # scheme, once the file is shown to be the one the entry signs
            from ledger._fingerprint import safetensors_digests

            path = checkpoint.directory / "model.safetensors"
            try:
                if safetensors_digests(path) == dict(checkpoint.body.tensor_digests):
                    return last, self.file_digests(path), f"the checkpoint at step {last}"
            except (LedgerError, OSError):
                pass  # the checkpoints check names a damaged checkpoint
        return last, None, ""

    def stored_checkpoints(self) -> list[Checkpoint]:
        """Checkpoints of the run's own branch (none a resume abandoned) whose files are here and were
        not found damaged, in chain order."""
        return [cp for cp in self.checkpoints if cp.seq not in self.damaged and cp.stored and not cp.superseded]


def dcp_directory(body: CheckpointBody, override: Path | None) -> Path:
    """Where a DCP checkpoint is: with ``--checkpoints DIR``, DIR itself when DIR is a DCP directory
    (it holds ``.metadata``) of the checkpoint's recorded name, else ``DIR/<recorded name>``; without
    it, the recorded path."""
    recorded = Path(body.path)
    if override is None:
        return recorded
    return override if is_dcp(override) and override.name == recorded.name else override / recorded.name


def _located(ledger_root: Path, body: CheckpointBody, genesis: Genesis, override: Path | None) -> Path:
    """A checkpoint's directory: under ``--checkpoints DIR`` when it is there, else where the run kept
    it (a run whose other checkpoints — a Trainer's checkpoint-N — were moved keeps its own in place)."""
    directory = checkpoint_directory(ledger_root, body, genesis, override)
    if override is not None and not directory.is_dir():
        try:
            kept = checkpoint_directory(ledger_root, body, genesis)
        except FormatError:
            return directory
        return kept if kept.is_dir() else directory
    return directory


def _within(spans: list[tuple[int, int]]) -> Callable[[int], bool]:
    """Whether a seq lies strictly inside one of ``spans`` (merged once; each lookup a bisection, so a
    ledger with many resumes costs n log n)."""
    merged: list[list[int]] = []
    for lo, hi in sorted((lo + 1, hi) for lo, hi in spans if hi - lo > 1):  # the seqs lo+1 … hi-1
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    starts = [lo for lo, _ in merged]

    def inside(seq: int) -> bool:
        i = bisect.bisect_right(starts, seq) - 1
        return i >= 0 and seq < merged[i][1]

    return inside


def build(loaded: Loaded, ledger_root: Path, checkpoint_dir: Path | None, limit: int | None = None) -> RunView:
    """Decode every entry the provenance checks need when the recorder wrote the ledger (raises
    FormatError for a genesis that breaks the schema). Only the first ``limit`` entries are decoded
    when given (those before the first broken link of the chain)."""
    view = RunView(genesis=Genesis.from_body(loaded.genesis or {}))
    if not view.recorded:
        return view  # nothing the provenance checks read: leave the bodies alone
    n = len(loaded.records) if limit is None else min(limit, len(loaded.records))
    # the records other than steps are read one by one; as one list when they are many
    headers, _ = loaded.headers()
    many = int((header_field(headers[:n], "kind") != Kind.STEP).sum()) > 4096
    records: list[bytes] | Records = loaded.records.materialize() if many else loaded.records
    step_at, others = step_entries(loaded, records, n)
    step_rows = np.asarray(step_at.rows, dtype=np.int64)
    bodies = Bodies.of_records(loaded.table["record"], step_rows, HEADER_SIZE)
    read = read_steps(bodies, view.genesis)
    view.accepted = tuple(Accepted(step_rows[a.positions], a.names, a.values) for a in read.accepted)
    # the malformed entries in the order of the passes that find them, each pass in chain order
    # (by record position): bodies that do not decode, resumes, bodies that break their schema
    undecoded: list[tuple[int, tuple[int, Kind, str]]] = [
        (step_at.rows[i], (step_at.seqs[i], Kind.STEP, why)) for i, (stage, why) in read.failed.items()
        if stage == "decode"]
    decoded: list[tuple[int, Header, dict[str, Any]]] = []  # (record position, header, body)
    for at, header in others:
        try:
            if header.kind not in (Kind.GENESIS, Kind.EVAL):
                decoded.append((at, header, decode_body(records[at][HEADER_SIZE:])))
        except FormatError as exc:
            undecoded.append((at, (header.seq, header.kind, str(exc))))
        except DECODER_GAPS as exc:
            undecoded.append((at, (header.seq, header.kind, f"{type(exc).__name__}: {exc}")))
    view.malformed += [entry for _, entry in sorted(undecoded, key=_first)]
    superseded_seqs: set[int] = set()
    resumes: list[tuple[int, ResumeBody]] = []  # (seq, body): what lies after its checkpoint was abandoned
    for _, header, body in decoded:  # resume entries come after the steps they supersede
        if header.kind is Kind.RESUME:
            try:
                resume = ResumeBody.from_body(body)
                span = resume.superseded
                if span is not None and not span.last_seq < header.seq:
                    raise FormatError(f"resume supersedes entries up to seq {span.last_seq}, at or after itself")
            except FormatError as exc:
                view.malformed.append((header.seq, header.kind, str(exc)))
                continue
            except DECODER_GAPS as exc:
                view.malformed.append((header.seq, header.kind, f"{type(exc).__name__}: {exc}"))
                continue
            if span is not None:  # only seqs that exist (a crafted span may name 2**62 of them)
                superseded_seqs.update(range(max(span.first_seq, 0), min(span.last_seq + 1, n)))
            resumes.append((header.seq, resume))
    pruned: set[bytes] = set()
    checkpoint_at: dict[int, tuple[int, bytes]] = {}  # seq -> (step, state digest) of every checkpoint entry
    broken: list[tuple[int, tuple[int, Kind, str]]] = []
    for at, header, body in decoded:
        try:
            if header.kind is Kind.CHECKPOINT:
                cp = CheckpointBody.from_body(body)
                checkpoint_at[header.seq] = (header.step, cp.state_digest)
                if not cp.stored_here:
                    view.dcp.append(Checkpoint(header.seq, header.step, cp, dcp_directory(cp, checkpoint_dir)))
                    continue
                view.checkpoints.append(Checkpoint(header.seq, header.step, cp,
                                                   _located(ledger_root, cp, view.genesis, checkpoint_dir)))
            elif header.kind is Kind.PRUNE:
                pruned.add(PruneBody.from_body(body).state_digest)
            elif header.kind is Kind.SEAL:
                view.seal = SealBody.from_body(body)
        except FormatError as exc:
            broken.append((at, (header.seq, header.kind, str(exc))))
        except DECODER_GAPS as exc:
            broken.append((at, (header.seq, header.kind, f"{type(exc).__name__}: {exc}")))
    step_seqs = _count_steps(view, read, step_at, bodies, superseded_seqs, broken)
    view.malformed += [entry for _, entry in sorted(broken, key=_first)]
    inside = _within(_abandoned(view, resumes, checkpoint_at, step_seqs, superseded_seqs))
    view.checkpoints = [Checkpoint(cp.seq, cp.step, cp.body, cp.directory, cp.body.state_digest in pruned,
                                   inside(cp.seq)) for cp in view.checkpoints]
    view.dcp = [Checkpoint(cp.seq, cp.step, cp.body, cp.directory, superseded=inside(cp.seq)) for cp in view.dcp]
    return view


def _first(entry: tuple[int, Any]) -> int:
    return int(entry[0])


def _count_steps(view: RunView, read: StepsRead, entries: StepEntries, bodies: Bodies, superseded: set[int],
                 broken: list[tuple[int, tuple[int, Kind, str]]]) -> list[int]:
    """Put the step entries that count in ``view.steps`` (the last entry of a step wins), list the
    superseded ones, add those that break the schema to ``broken``; returns the seqs of every step
    entry whose body decoded."""
    failed = read.failed
    counted: dict[int, int] = {}  # step -> its entry's index in ``read``
    seqs: list[int] = []
    if not failed and not superseded:
        steps = np.asarray(entries.steps)
        if steps.dtype == np.int64 and bool((steps[1:] > steps[:-1]).all()):  # each step once, in order
            view.steps = Steps.in_order(read, steps, bodies, view.genesis)
            return entries.seqs
        counted = dict(zip(entries.steps, range(len(entries.steps)), strict=True))
        seqs = entries.seqs
    else:
        for i, (seq, step) in enumerate(zip(entries.seqs, entries.steps, strict=True)):
            failure = failed.get(i)
            if failure is not None and failure[0] == "decode":
                continue
            seqs.append(seq)
            if seq in superseded:
                view.superseded.append((seq, step))
            elif failure is not None:
                broken.append((entries.rows[i], (seq, Kind.STEP, failure[1])))
            else:
                counted[step] = i
    view.steps = Steps.counted(read, counted, bodies, view.genesis)
    return seqs


def _abandoned(view: RunView, resumes: list[tuple[int, ResumeBody]], checkpoint_at: dict[int, tuple[int, bytes]],
               step_seqs: list[int], superseded: set[int]) -> list[tuple[int, int]]:
    """The (checkpoint seq, resume seq) spans whose checkpoint entries a resume abandoned. A resume
    is believed only when it names a checkpoint entry before it, of its step and state digest, and
    supersedes every step entry between that checkpoint and itself; otherwise it is malformed (the
    continuity check fails naming it) and abandons nothing, so no resume can take checkpoints out of
    the evidence while their steps still count."""
    spans = []
    steps = sorted(step_seqs)
    for seq, resume in resumes:
        c = resume.checkpoint_seq
        if checkpoint_at.get(c) != (resume.checkpoint_step, resume.state_digest) or not c < seq:
            view.malformed.append((seq, Kind.RESUME, f"resume names checkpoint seq {c}, which is not a checkpoint "
                                                     f"entry of step {resume.checkpoint_step} with its state digest"))
            continue
        between = steps[bisect.bisect_right(steps, c):bisect.bisect_left(steps, seq)]
        live = [s for s in between if s not in superseded]
        if live:
            view.malformed.append((seq, Kind.RESUME, f"resume from checkpoint seq {c} leaves step entry seq "
                                                     f"{live[0]} after that checkpoint counted (not superseded)"))
            continue
        spans.append((c, seq))
    return spans

