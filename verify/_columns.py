"""The recorded steps as columns: one array per field over all steps, instead of an object per step.

:func:`step_entries` finds the step entries from the headers of all records at once;
:func:`read_steps` checks and reads their bodies — those of one shape at once through a
:class:`~ledger.verify._template.Template`, the rest one by one with ``decode_body`` and
``StepBody.from_body`` — into :class:`StepColumns`; :class:`Steps` is the run view's mapping from step
to ``StepBody``, which decodes a body only when one is asked for.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import numpy as np

from ledger._encoding import _SCAN_FROM, decode_body
from ledger._record import FORMAT_VERSION, HEADER_SIZE, MAX_RECORD_BYTES, Header, Kind, decode_header
from ledger._schema import Genesis, StepBody
from ledger.errors import FormatError
from ledger.verify._load import Bodies, Loaded, Records, header_field
from ledger.verify._template import Accepted, Template, template

# what a schema decoder may still raise on a crafted body instead of FormatError (reported as malformed)
DECODER_GAPS = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError)
V = TypeVar("V")
MIN_GROUP = 16  # bodies of one length worth a template
MAX_TEMPLATES = 16  # templates tried per body length (a hostile ledger may make every body different)
MATCH_BYTES = 32 << 20  # bodies compared with a template at once (bounds the matching's extra memory)


@dataclass
class StepColumns:
    """Per recorded step (rows in the order given): norms (rows × tensors), learning rates and
    gradient norms (rows × groups, NaN where a row logs none), optimizer steps, and by row the fields
    only some steps carry (``sketches``, ``hyper``, ``optimizer_steps_each``)."""

    steps: np.ndarray
    norms: np.ndarray
    optimizer_steps: np.ndarray
    lrs: np.ndarray
    has_lrs: np.ndarray
    grad_norms: np.ndarray
    has_grad_norms: np.ndarray
    sketches: dict[int, np.ndarray] = field(default_factory=dict)
    hyper: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    each: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def empty(cls, rows: int, tensors: int, groups: int) -> StepColumns:
        """Columns for ``rows`` steps, to be filled (step numbers −1, arrays NaN)."""
        return cls(np.full(rows, -1, np.int64), np.full((rows, tensors), np.nan), np.zeros(rows, np.int64),
                   np.full((rows, groups), np.nan), np.zeros(rows, bool), np.full((rows, groups), np.nan),
                   np.zeros(rows, bool))

    def take(self, rows: np.ndarray) -> StepColumns:
        """These rows, in this order."""
        where = np.full(len(self.steps), -1, dtype=np.int64)  # old row -> new row
        where[rows] = np.arange(len(rows))
        return StepColumns(self.steps[rows], self.norms[rows], self.optimizer_steps[rows], self.lrs[rows],
                           self.has_lrs[rows], self.grad_norms[rows], self.has_grad_norms[rows],
                           _moved(self.sketches, where), _moved(self.hyper, where), _moved(self.each, where))

    def fill(self, row: int, body: StepBody) -> None:
        """Put one decoded body in ``row``."""
        self.norms[row] = body.norms
        self.optimizer_steps[row] = body.optimizer_steps
        if body.lrs is not None:
            self.lrs[row], self.has_lrs[row] = body.lrs, True
        if body.grad_norms is not None:
            self.grad_norms[row], self.has_grad_norms[row] = body.grad_norms, True
        if body.sketch is not None:
            self.sketches[row] = body.sketch
        if body.hyper is not None:
            self.hyper[row] = body.hyper
        if body.optimizer_steps_each is not None:
            self.each[row] = body.optimizer_steps_each

    def fill_many(self, rows: np.ndarray, shape: Template, matrix: np.ndarray, model: StepBody) -> None:
        """Put the bodies of ``matrix`` (one per row, all matching ``shape``, whose template decoded to
        ``model``) in ``rows``."""
        self.norms[rows] = shape.array(matrix, "norms")
        self.optimizer_steps[rows] = model.optimizer_steps
        if model.lrs is not None:
            self.lrs[rows], self.has_lrs[rows] = shape.array(matrix, "lrs"), True
        if model.grad_norms is not None:
            self.grad_norms[rows], self.has_grad_norms[rows] = shape.array(matrix, "grad_norms"), True
        if model.sketch is not None:
            self.sketches.update(zip(rows.tolist(), shape.array(matrix, "sketch"), strict=True))
        if model.optimizer_steps_each is not None:
            for row in rows.tolist():
                self.each[row] = list(model.optimizer_steps_each)


def _moved(by_row: dict[int, V], where: np.ndarray) -> dict[int, V]:
    """``by_row`` with its rows renumbered by ``where`` (rows it maps to −1 dropped), in the new order."""
    new = where[np.fromiter(by_row, dtype=np.int64, count=len(by_row))]
    values = list(by_row.values())
    return {int(new[i]): values[i] for i in np.argsort(new, kind="stable").tolist() if new[i] >= 0}


@dataclass
class StepsRead:
    """What :func:`read_steps` found: the columns (a row per body), the bodies it decoded one by one,
    per failed body the stage (``"decode"`` or ``"schema"``) and the message, and the metrics of
    the bodies templates accepted (``positions`` index the bodies)."""

    columns: StepColumns
    decoded: dict[int, StepBody]
    failed: dict[int, tuple[str, str]]
    accepted: list[Accepted] = field(default_factory=list)


def read_steps(bodies: Bodies | list[bytes], genesis: Genesis) -> StepsRead:
    """Check and read step bodies, exactly as ``StepBody.from_body(decode_body(body), genesis)`` would
    one by one (same values, same refusals)."""
    if not isinstance(bodies, Bodies):
        bodies = Bodies.of(bodies)
    groups = sum(len(o.param_groups) for o in genesis.all_optimizers)
    out = StepsRead(StepColumns.empty(len(bodies), len(genesis.tensor_order), groups), {}, {})
    pending = np.ones(len(bodies), dtype=bool)
    lengths = bodies.lengths()
    sizes, counts = np.unique(lengths, return_counts=True)
    for size in sizes[(counts >= MIN_GROUP) & (sizes <= _SCAN_FROM)].tolist():
        _by_template(bodies, np.flatnonzero(lengths == size), genesis, out, pending)
    for i in np.flatnonzero(pending).tolist():
        _one(bodies, i, genesis, out)
    return out


def _by_template(bodies: Bodies, idx: np.ndarray, genesis: Genesis, out: StepsRead, pending: np.ndarray) -> None:
    """Read the bodies ``idx`` (all of one length) through templates taken from their own first bodies."""
    matrix = bodies.matrix(idx)
    left = np.arange(len(idx))
    for _ in range(MAX_TEMPLATES):
        if len(left) < MIN_GROUP:
            return
        first = int(idx[left[0]])
        model = _one(bodies, first, genesis, out)
        pending[first] = False
        shape = template(bodies[first], model) if model is not None else None
        if model is None or shape is None:
            left = left[1:]
            continue
        per = max(1, MATCH_BYTES // matrix.shape[1])
        match = np.concatenate([shape.matches(_rows(matrix, left[i:i + per])) for i in range(0, len(left), per)])
        rows = left[match]
        for i in range(0, len(rows), per):
            part = rows[i:i + per]
            block = _rows(matrix, part)
            out.columns.fill_many(idx[part], shape, block, model)
            if shape.metrics is not None:
                out.accepted.append(Accepted(idx[part], shape.metrics[0], shape.metric_values(block)))
        pending[idx[rows]] = False
        if len(rows) < MIN_GROUP:  # bodies that do not share shapes: the rest are read one by one
            return
        left = left[~match]


def _rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[rows]`` for ascending ``rows``: a view when they are consecutive."""
    if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1:
        view: np.ndarray = matrix[int(rows[0]):int(rows[-1]) + 1]
        return view
    copy: np.ndarray = matrix[rows]
    return copy


def _one(bodies: Bodies, i: int, genesis: Genesis, out: StepsRead) -> StepBody | None:
    """Read body ``i`` on its own (None when it fails, recorded in ``out.failed``)."""
    stage = "decode"
    try:
        body = decode_body(bodies[i])
        stage = "schema"
        step = StepBody.from_body(body, genesis)
    except FormatError as exc:
        out.failed[i] = (stage, str(exc))
        return None
    except DECODER_GAPS as exc:
        out.failed[i] = (stage, f"{type(exc).__name__}: {exc}")
        return None
    out.columns.fill(i, step)
    out.decoded[i] = step
    return step


@dataclass(frozen=True)
class StepEntries:
    """The step entries of a ledger, in chain order: their record positions, seqs and steps."""

    rows: list[int]
    seqs: list[int]
    steps: list[int]


def step_entries(loaded: Loaded, records: list[bytes] | Records,
                 limit: int) -> tuple[StepEntries, list[tuple[int, Header]]]:
    """The step entries among the first ``limit`` of ``records`` (those of ``loaded``), their headers
    read all at once from the Arrow buffers, and the headers of the other entries, read one by one;
    records whose header is damaged are left out (the chain check names them)."""
    matrix, lengths = loaded.headers()
    matrix, lengths = matrix[:limit], lengths[:limit]
    seqs, steps = header_field(matrix, "seq"), header_field(matrix, "step")
    fast = ((lengths >= HEADER_SIZE) & (lengths <= MAX_RECORD_BYTES) & (header_field(matrix, "kind") == Kind.STEP)
            & (header_field(matrix, "version") == FORMAT_VERSION) & (header_field(matrix, "reserved") == 0)
            & (seqs >= 0))
    rows = np.flatnonzero(fast).tolist()
    entries = StepEntries(rows, seqs[fast].tolist(), steps[fast].tolist())
    others: list[tuple[int, Header]] = []
    for i in np.flatnonzero(~fast).tolist():
        try:
            header = decode_header(records[i])
        except FormatError:
            continue
        if header.kind is Kind.STEP:  # a seq beyond int64 (the chain check fails it): in chain order
            at = bisect.bisect(entries.rows, i)
            entries.rows.insert(at, i)
            entries.seqs.insert(at, header.seq)
            entries.steps.insert(at, header.step)
        else:
            others.append((i, header))
    return entries, others


class Steps(Mapping[int, StepBody]):
    """The recorded steps that count, by step number (ascending): their columns, and each
    ``StepBody`` decoded from its body when asked for (kept once decoded)."""

    def __init__(self, columns: StepColumns, bodies: Bodies, genesis: Genesis | None,
                 decoded: dict[int, StepBody] | None = None) -> None:
        self.columns, self._bodies, self._genesis = columns, bodies, genesis
        self._decoded: dict[int, StepBody] = dict(decoded or {})

    @cached_property
    def _rows(self) -> dict[object, int]:
        return {s: r for r, s in enumerate(self.columns.steps.tolist())}

    def _find(self, step: object) -> int | None:
        """The row of ``step``, or None: as :attr:`_rows` would say, found in the ascending steps by
        bisection for an int (the mapping is built only for other keys)."""
        if type(step) is int and -(1 << 63) <= step < 1 << 63:
            steps = self.columns.steps
            row = int(np.searchsorted(steps, step))
            return row if row < len(steps) and int(steps[row]) == step else None
        return self._rows.get(step)

    @classmethod
    def counted(cls, read: StepsRead, counted: dict[int, int], bodies: Bodies, genesis: Genesis) -> Steps:
        """The steps that count (step → index in ``read``, of ``bodies``), ascending."""
        order = sorted(counted)
        rows = np.asarray([counted[s] for s in order], dtype=np.int64)
        read.columns.steps[rows] = order
        where = np.full(len(read.columns.steps), -1, dtype=np.int64)  # index in ``read`` -> row
        where[rows] = np.arange(len(rows))
        decoded = {int(where[old]): body for old, body in read.decoded.items() if where[old] >= 0}
        return cls(read.columns.take(rows), bodies.take(rows), genesis, decoded)

    @classmethod
    def in_order(cls, read: StepsRead, steps: np.ndarray, bodies: Bodies, genesis: Genesis) -> Steps:
        """Every entry of ``read`` counts and ``steps`` (theirs) ascend strictly: :meth:`counted` with
        each step mapped to its own entry, without the mapping."""
        read.columns.steps[:] = steps
        return cls(read.columns.take(np.arange(len(steps))), bodies, genesis, read.decoded)

    @classmethod
    def none(cls) -> Steps:
        """No steps."""
        return cls(StepColumns.empty(0, 0, 0), Bodies.of([]), None)

    def __getitem__(self, step: int) -> StepBody:
        row = self._find(step)
        if row is None:
            raise KeyError(step)
        body = self._decoded.get(row)
        if body is None:
            body = self._decoded[row] = StepBody.from_body(decode_body(self._bodies[row]), self._genesis)
        return body

    def __contains__(self, step: object) -> bool:
        return self._find(step) is not None

    def __iter__(self) -> Iterator[int]:
        return iter(self.columns.steps.tolist())

    def __len__(self) -> int:
        return len(self.columns.steps)

    def row(self, step: int) -> int:
        """The row of a recorded step in :attr:`columns`."""
        row = self._find(step)
        if row is None:
            raise KeyError(step)
        return row


__all__ = ["DECODER_GAPS", "StepColumns", "StepEntries", "Steps", "StepsRead", "read_steps", "step_entries"]
