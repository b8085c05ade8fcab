"""Which intervals replay re-executes: consecutive stored checkpoints (the init rebuilt by the recipe
when no checkpoint of it is stored), chosen for anomalies, the final state, the largest update (by
distance, not by change of norms) and the verifier's own random draw."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ledger._state import read_weights
from ledger._weights import NumpySketch
from ledger.errors import FormatError
from ledger.verify._run import Checkpoint, RunView

TOP_Q = 1


@dataclass(frozen=True, slots=True)
class Interval:
    """Steps ``from_step + 1 … to_step``: from a stored checkpoint, or (``start`` None) from the
    virtual init checkpoint rebuilt from the recipe."""

    start: Checkpoint | None
    end: Checkpoint

    @property
    def from_step(self) -> int:
        """The step of the start state (−1 for the init)."""
        return -1 if self.start is None else self.start.step

    @property
    def to_step(self) -> int:
        """The step of the end checkpoint."""
        return self.end.step


def moves(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, float]:
    """|new − old| per coordinate of two flat float64 arrays (the same coordinates before and after;
    an unchanged ±inf, a mask, moved 0, not NaN) and its sum of squares."""
    with np.errstate(invalid="ignore"):
        moved: np.ndarray = np.subtract(new, old)
        np.abs(moved, out=moved)
    squares = float(np.dot(moved, moved)) if moved.size else 0.0
    if math.isnan(squares):  # inf − inf, or a NaN
        moved[old == new] = 0.0
        squares = float(np.dot(moved, moved))
    return moved, squares


class Distance:
    """The L2 distance and the largest coordinate change between two stored states, added up tensor
    by tensor or run by run (:meth:`add`, in order)."""

    def __init__(self) -> None:
        self.squares, self.largest = 0.0, 0.0

    def add(self, squares: float, largest: float) -> None:
        """The sum of squares and the largest of some coordinates' moves (:func:`moves`)."""
        self.squares += squares
        self.largest = max(self.largest, largest)

    def result(self) -> dict[str, float]:
        return {"distance": math.sqrt(self.squares), "max_coordinate": self.largest}


def state_distance(before: dict[str, np.ndarray], after: dict[str, np.ndarray], order: list[str]) -> dict[str, float]:
    """L2 distance and largest coordinate change between two stored states, over the tensors of
    ``order`` both hold with one shape (what replay ranks intervals by; continuity measures it
    between checkpoints as it streams them)."""
    distance = Distance()
    for name in order:
        if name in before and name in after and before[name].shape == after[name].shape and before[name].size:
            moved, squares = moves(before[name].astype(np.float64).ravel(), after[name].astype(np.float64).ravel())
            distance.add(squares, float(moved.max()))
    return distance.result()


def intervals(view: RunView, virtual_init: bool = True) -> list[Interval]:
    """Consecutive pairs of checkpoints whose files are here (pruned or missing ones break a pair);
    with ``virtual_init``, (init → first stored checkpoint) when no checkpoint of step −1 is stored."""
    stored = view.stored_checkpoints()
    out = [Interval(a, b) for a, b in zip(stored, stored[1:], strict=False) if b.step > a.step]
    if virtual_init and not any(cp.step == -1 for cp in stored):
        first = next((cp for cp in stored if cp.step >= 0), None)
        if first is not None:
            out.insert(0, Interval(None, first))
    return out


def choose(pairs: list[Interval], anomalies: list[dict[str, Any]], distances: list[float], n_random: int,
           seed: int) -> dict[int, list[str]]:
    """Index of each chosen interval → why it was chosen: continuity anomalies, the final state
    (the interval ending at the last stored checkpoint), the largest update (``distances``: how far
    the weights moved over each interval) and ``n_random`` drawn with ``seed``."""
    why: dict[int, list[str]] = {}
    for anomaly in anomalies:
        for i, interval in enumerate(pairs):
            if interval.from_step < anomaly["step"] <= interval.to_step:
                why.setdefault(i, []).append("continuity anomaly")
    if pairs:
        why.setdefault(max(range(len(pairs)), key=lambda i: pairs[i].end.seq), []).append("final state")
    for i in sorted(range(len(pairs)), key=lambda i: -distances[i])[:TOP_Q]:
        why.setdefault(i, []).append("largest update")
    rng = random.Random(seed)
    for i in rng.sample(range(len(pairs)), min(n_random, len(pairs))):
        why.setdefault(i, []).append("random")
    return why


def logged_sketch(view: RunView, step: int) -> np.ndarray | None:
    """The sketch logged for the state after ``step`` (the genesis init sketch for −1)."""
    k = view.policy.sketch_k
    body = view.steps.get(step)
    sketch: np.ndarray | None = view.init.sketch if step == -1 else body.sketch if body is not None else None
    return sketch if sketch is not None and sketch.shape == (k,) else None


def interval_movement(view: RunView, pairs: list[Interval],
                      measured: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """How far the weights moved over each interval (``distance``, an L2 distance or estimate) and
    the evidence: the logged sketches of both ends; else the stored weights of both ends (L2, and
    ``max_coordinate``: L∞) — taken from ``measured`` (the distances ``continuity`` computed between
    consecutive stored checkpoints) when it has them, read otherwise; else, from the init, the init
    sketch against the sketch of the end checkpoint's weights; else the sum of per-step norm changes."""
    known = {(m["from_step"], m["to_step"]): m for m in measured}
    order = view.tensor_order
    sketcher = NumpySketch.of(view.policy)
    by_norms: dict[int, float] | None = None
    cache: dict[int, dict[str, np.ndarray]] = {}

    def weights(cp: Checkpoint) -> dict[str, np.ndarray] | None:
        if cp.seq not in cache:
            try:
                loaded = read_weights(cp.directory)
            except (OSError, ValueError, FormatError):
                return None
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[cp.seq] = loaded
        return cache[cp.seq]

    # sketches that leave tensors out (sketch_skips: buffers) do not see a jump of those tensors, which
    # only replay checks: rank by the real weights then
    partial = bool(view.policy.sketch_skips)
    out: list[dict[str, Any]] = []
    for interval in pairs:
        start_sketch, end_sketch = logged_sketch(view, interval.from_step), logged_sketch(view, interval.to_step)
        if start_sketch is not None and end_sketch is not None and not partial:
            out.append({"distance": float(np.linalg.norm(end_sketch - start_sketch)), "evidence": "sketches"})
            continue
        if interval.start is not None and (interval.from_step, interval.to_step) in known:
            m = known[(interval.from_step, interval.to_step)]
            out.append({"distance": m["distance"], "max_coordinate": m["max_coordinate"], "evidence": "weights"})
            continue
        end = weights(interval.end)
        start = weights(interval.start) if interval.start is not None else None
        if start is not None and end is not None:
            out.append({**state_distance(start, end, order), "evidence": "weights"})
        elif interval.start is None and start_sketch is not None and end is not None and not partial:
            real = sketcher({n: end[n] for n in order if n in end})
            out.append({"distance": float(np.linalg.norm(real - start_sketch)),
                        "evidence": "init sketch against the end checkpoint's weights"})
        else:
            by_norms = movement(view) if by_norms is None else by_norms
            total = sum(by_norms.get(s, 0.0) for s in range(interval.from_step + 1, interval.to_step + 1))
            out.append({"distance": total, "evidence": "norm changes"})
    return out


def movement(view: RunView) -> dict[int, float]:
    """How far each step moved the weights, by the sum of per-tensor norm changes (the ranking of
    last resort)."""
    cols = view.steps.columns
    if not view.recorded or not len(cols.steps) or view.init.norms.shape != cols.norms.shape[1:]:
        return {}
    prev = np.vstack([view.init.norms[None, :], cols.norms[:-1]])
    return dict(zip(cols.steps.tolist(), np.abs(cols.norms - prev).sum(axis=1).tolist(), strict=True))
