"""A decoded view of a recorded run: genesis, the step entries that count, checkpoints, prunes."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ledger._blocked import TENSOR_V1, safetensors_digests_as
from ledger._dcp import is_dcp
from ledger._encoding import decode_body
from ledger._record import FORMAT_VERSION, HEADER_SIZE, MAX_RECORD_BYTES, Kind, decode_header
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
from ledger.verify._columns import DECODER_GAPS, Steps, StepsRead, read_steps
from ledger.verify._load import Loaded, header_field, header_matrix


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
    records = loaded.records.materialize()
    if limit is not None:
        records = records[:limit]
    headers = _headers(loaded, records)
    step_records = [record for header, record in headers if header.kind is Kind.STEP]
    read = read_steps([r[HEADER_SIZE:] for r in step_records], view.genesis)
    decoded: list[tuple[_Entry, dict[str, Any]]] = []  # a step entry's body: {"index": its index in ``read``}
    steps_seen = 0
    for header, record in headers:
        if header.kind is Kind.STEP:
            index, steps_seen = steps_seen, steps_seen + 1
            failure = read.failed.get(index)
            if failure is not None and failure[0] == "decode":
                view.malformed.append((header.seq, header.kind, failure[1]))
            else:
                decoded.append((header, {"index": index}))
            continue
        try:
            if header.kind not in (Kind.GENESIS, Kind.EVAL):
                decoded.append((header, decode_body(record[HEADER_SIZE:])))
        except FormatError as exc:
            view.malformed.append((header.seq, header.kind, str(exc)))
        except DECODER_GAPS as exc:
            view.malformed.append((header.seq, header.kind, f"{type(exc).__name__}: {exc}"))
    superseded_seqs: set[int] = set()
    resumes: list[tuple[int, ResumeBody]] = []  # (seq, body): what lies after its checkpoint was abandoned
    for header, body in decoded:  # resume entries come after the steps they supersede
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
                superseded_seqs.update(range(max(span.first_seq, 0), min(span.last_seq + 1, len(records))))
            resumes.append((header.seq, resume))
    pruned: set[bytes] = set()
    counted: dict[int, int] = {}  # step -> its entry's index in ``read`` (the last entry of a step wins)
    step_seqs: list[int] = []
    checkpoint_at: dict[int, tuple[int, bytes]] = {}  # seq -> (step, state digest) of every checkpoint entry
    for header, body in decoded:
        try:
            if header.kind is Kind.STEP:
                step_seqs.append(header.seq)
                if header.seq in superseded_seqs:
                    view.superseded.append((header.seq, header.step))
                elif (failure := read.failed.get(body["index"])) is not None:
                    view.malformed.append((header.seq, header.kind, failure[1]))
                else:
                    counted[header.step] = body["index"]
            elif header.kind is Kind.CHECKPOINT:
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
            view.malformed.append((header.seq, header.kind, str(exc)))
        except DECODER_GAPS as exc:
            view.malformed.append((header.seq, header.kind, f"{type(exc).__name__}: {exc}"))
    view.steps = _steps(read, counted, step_records, view.genesis)
    inside = _within(_abandoned(view, resumes, checkpoint_at, step_seqs, superseded_seqs))
    view.checkpoints = [Checkpoint(cp.seq, cp.step, cp.body, cp.directory, cp.body.state_digest in pruned,
                                   inside(cp.seq)) for cp in view.checkpoints]
    view.dcp = [Checkpoint(cp.seq, cp.step, cp.body, cp.directory, superseded=inside(cp.seq)) for cp in view.dcp]
    return view


class _Entry(NamedTuple):
    """What the run view needs of a record's header."""

    kind: Kind
    seq: int
    step: int


def _headers(loaded: Loaded, records: list[bytes]) -> list[tuple[_Entry, bytes]]:
    """Each record with its header's kind, seq and step, in order; records whose header is damaged
    are left out (the chain check names them). Step entries' headers are read all at once from the
    Arrow buffers, the others one by one."""
    matrix, lengths = header_matrix(loaded.table["record"])
    matrix, lengths = matrix[:len(records)], lengths[:len(records)]
    seqs, steps = header_field(matrix, "seq"), header_field(matrix, "step")
    fast = ((lengths >= HEADER_SIZE) & (lengths <= MAX_RECORD_BYTES) & (header_field(matrix, "kind") == Kind.STEP)
            & (header_field(matrix, "version") == FORMAT_VERSION) & (header_field(matrix, "reserved") == 0)
            & (seqs >= 0))
    out: list[tuple[_Entry, bytes]] = []
    for record, quick, seq, step in zip(records, fast.tolist(), seqs.tolist(), steps.tolist(), strict=True):
        if quick:
            out.append((_Entry(Kind.STEP, seq, step), record))
            continue
        try:
            header = decode_header(record)
        except FormatError:
            continue
        out.append((_Entry(header.kind, header.seq, header.step), record))
    return out


def _steps(read: StepsRead, counted: dict[int, int], records: list[bytes], genesis: Genesis) -> Steps:
    """The steps that count, ascending, as columns (with the bodies decoded on the way)."""
    order = sorted(counted)
    rows = np.asarray([counted[s] for s in order], dtype=np.int64)
    read.columns.steps[rows] = order
    decoded = {new: read.decoded[old] for new, old in enumerate(rows.tolist()) if old in read.decoded}
    return Steps(read.columns.take(rows), [records[r][HEADER_SIZE:] for r in rows.tolist()], genesis, decoded)


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

