"""``continuity``: every recorded update fits within what the optimizer can do, and the released
weights are the state at the last step.

Evidence, each named in the result only when it was used: per-tensor norms every step (against the
L2 bound of :mod:`ledger.verify._bounds`), sketches between sketched steps (the L2 bound summed, with
Johnson–Lindenstrauss slack), and the real weights of consecutive stored checkpoints (per
coordinate for Adam/AdamW, L2 per group for SGD). Where a checkpoint is stored, the logged sketch,
norms and hyperparameters are checked against it. Parameters in no recorded optimizer group may not
move (buffers may: they are named). The seal's final weights must equal the state at the last step
(its checkpoint or logged digests; else its norms and sketch against ``--model``, which is weaker
and says so). A verdict resting on norms alone warns.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ledger._blocked import TENSOR_V1
from ledger._record import Kind
from ledger._state import FILES, checkpoint_file, read_meta
from ledger._weights import Fingerprint, Fingerprints, NumpySketch, TensorFile, map_runs
from ledger.verify._bounds import Bounds, dtype_rounding, norm_rtol
from ledger.verify._columns import StepColumns
from ledger.verify._context import Context
from ledger.verify._intervals import Distance, moves
from ledger.verify._result import CheckResult, Lists, Status
from ledger.verify._run import Checkpoint, RunView

SKETCH_RTOL = 1e-6  # sketch of the same weights, another summation order (float64)
FLOAT32_SQUARES = math.sqrt(float(np.finfo(np.float32).max))  # a norm whose float32 sum of squares overflows
HYPER_KEYS = ("betas", "momentum", "weight_decay", "eps")


def check_continuity(ctx: Context) -> CheckResult:
    """Check every step's update against the optimizer bound (norms, sketches, checkpoints) and the
    final weights against the last step."""
    view = ctx.view
    assert view is not None
    if not view.steps and not view.malformed:
        return CheckResult("continuity", Status.SKIP, "no recorded steps with fingerprints to check")
    bounds = Bounds(view)
    metas = {cp.seq: read_meta(cp.directory) for cp in view.stored_checkpoints()}  # state.cbor, read once
    walk = _Walk(view, bounds, _lr_cap(metas, bounds))
    walk.run()
    cols = view.steps.columns
    skipped = cols.steps[cols.optimizer_steps == 0].tolist()
    evidence = [f"per-tensor norms at {len(view.steps)} steps"
                + (f", {len(skipped)} skipped (no optimizer step: checked not to move)" if skipped else "")]
    if walk.sketch_checks:
        evidence.append(f"sketches at {walk.sketch_checks} step(s)")
    intervals = _check_checkpoints(view, bounds, walk, metas)
    walk.buffers_moved = sorted(set(walk.buffers_moved) | _buffers_changed(view, bounds))
    if ctx.model is not None and (released := _header_layout(ctx.model)) is not None:
        last = int(view.steps.columns.steps[-1]) if len(view.steps.columns.steps) else -1
        _layout_problem(view, bounds, walk, released, last, f"the released weights' ({ctx.model.name})")
    if intervals:
        evidence.append(f"{intervals} checkpoint interval(s) on the real weights")
    granularity = _granularity(view, walk.sketched)
    if walk.sketch_checks or intervals:
        evidence.append(f"a jump the norms miss localised to ≤ {granularity} step(s)")
    final, weak_final = _check_final(ctx, view, walk)
    if final:
        evidence.append(final)
    anomalies, notes = walk.anomalies, list(walk.notes)
    data: dict[str, Any] = {
        "steps_checked": len(view.steps), "anomalies": anomalies,
        "margin": walk.margin, "superseded_steps": [s for _, s in view.superseded],
        "skipped_steps": skipped[:1000],
        "checkpoint_intervals_checked": intervals, "sketch_steps_checked": walk.sketch_checks,
        "distance_from_init": walk.distance[:: max(1, len(walk.distance) // 1000)],
        "optimizer_family": bounds.family, "sketch_intervals_skipped": walk.sketch_skipped + walk.sketch_nan,
        "evidence": evidence, "buffers_moved": walk.buffers_moved, "localisation_steps": granularity,
    }
    plot = Lists({**walk.series, "family": bounds.family or "", "distance_from_init": walk.distance,
                  "checkpoint_distances": walk.checkpoint_distances})
    name = bounds.family or "+".join(bounds.unknown)
    if anomalies:
        named = "; ".join(_describe(a) for a in anomalies[:6])
        return CheckResult("continuity", Status.FAIL, f"{len(anomalies)} update(s) break continuity ({name}): "
                           f"{named}{' …' if len(anomalies) > 6 else ''}", data, series=plot)
    margin = f"largest honest ratio to the bound {walk.margin:.4f}" if walk.margin is not None else "no ratios"
    if view.superseded:
        notes.append(f"{len(view.superseded)} superseded step entries excluded")
    if walk.buffers_moved:
        notes.append(f"buffers outside the optimizer changed and are exempt: {', '.join(walk.buffers_moved[:5])}")
    if walk.sketch_nan:
        notes.append(f"sketch evidence skipped for {walk.sketch_nan} sketch(es) with no slot finite in it and in the "
                     "sketch before (NaN, or infinities from a buffer holding ±inf)")
    if walk.sketch_skipped:
        notes.append(f"sketch evidence skipped for {walk.sketch_skipped} interval(s) in which tensors outside the "
                     "optimizer (e.g. normalisation statistics) changed")
    tail = "".join(f"; {n}" for n in notes)
    if bounds.family is None:
        return CheckResult("continuity", Status.WARN, f"no update bound is known for {', '.join(bounds.unknown)}: "
                           f"its steps were checked only for gaps, logged fingerprints against checkpoints and the "
                           f"final state (evidence: {', '.join(evidence)}){tail}", data,
                           summary="optimizer without a known bound", series=plot)
    weak = _weakness(view, bounds, walk, intervals) or weak_final or _unconfirmed_lr(walk) \
        or _unconfirmed_sizes(bounds, walk)
    detail = f"{len(view.steps)} steps within the {bounds.family} update bound (evidence: {', '.join(evidence)}); " \
             f"{margin}{tail}"
    if weak:
        return CheckResult("continuity", Status.WARN, f"{detail}; but {weak}", data, summary=weak, series=plot)
    return CheckResult("continuity", Status.PASS, detail, data, series=plot)


def _granularity(view: RunView, sketched: set[int]) -> int:
    """The most steps between two points where the weights are pinned beyond their norms — a sketch
    checked against the bound (``sketched``: their steps) or a stored checkpoint (the init counts, and
    so does the last step): what a jump the norms do not show is localised to. The entries say which
    carry a sketch; this is what those that could be checked gave."""
    cols = view.steps.columns
    if not len(cols.steps):
        return 0
    marks = {-1, int(cols.steps[-1])} | sketched | {cp.step for cp in view.stored_checkpoints()}
    return int(np.diff(np.asarray(sorted(marks))).max())


def _lr_cap(metas: dict[int, dict[str, Any]], bounds: Bounds) -> np.ndarray | None:
    """Per param group, the largest learning rate any stored checkpoint's optimizer holds (None when
    no checkpoint is stored)."""
    caps: list[list[float]] = []
    for meta in metas.values():
        groups = meta.get("param_groups")
        if isinstance(groups, list) and len(groups) == len(bounds.groups):
            caps.append([float(g.get("lr", math.inf)) if isinstance(g, dict) and isinstance(g.get("lr"), (int, float))
                         else math.inf for g in groups])
    return np.max(np.asarray(caps), axis=0) if caps else None


def _unconfirmed_lr(walk: _Walk) -> str:
    """Steps that fit the bound only with a logged learning rate above any a checkpoint holds."""
    if not walk.unconfirmed:
        return ""
    steps = ", ".join(str(s) for s, _, _ in walk.unconfirmed[:5])
    s, lr, ratio = max(walk.unconfirmed, key=lambda u: u[2])
    return (f"step(s) {steps} fit the bound only with a logged learning rate above any a stored checkpoint holds "
            f"(step {s}: lr {lr:g}, {ratio:.3g}× the bound at the checkpoints' rate): those rates are the "
            "trainer's claims here; replay with --recipe checks them against the schedule")


def _unconfirmed_sizes(bounds: Bounds, walk: _Walk) -> str:
    """The Adam bound is built from each tensor's size, which genesis states: unconfirmed when no
    real tensor (a stored checkpoint, ``--model``) was read."""
    if walk.layout or not any(f in ("adam", "adamw") for f in bounds.group_family):
        return ""
    return ("the tensor sizes the Adam bound is built from are genesis's claims here: no stored checkpoint or "
            "--model was read to confirm them (give --model)")


def _weakness(view: RunView, bounds: Bounds, walk: _Walk, intervals: int) -> str:
    """Why a continuity pass would claim more than its evidence shows ("" when it does not)."""
    if bounds.vacuous:
        return "Adam with β1² > β2: the bound grows without limit, so it is vacuous"
    if walk.unchecked:
        return (f"the norms of {', '.join(walk.unchecked[:5])} stay infinite, so their updates were not checked "
                "against the bound (a frozen tensor holding ±inf?)")
    share = _share(view, walk, walk.buffers_moved)
    if share > BUFFER_SHARE:
        return (f"buffers outside every optimizer group that changed ({', '.join(walk.buffers_moved[:5])}) hold "
                f"{share:.0%} of the model's floating-point coordinates: continuity checks none of their changes "
                "(normalisation statistics hold far less; replay with --recipe checks them)")
    if not walk.sketch_checks and not intervals:
        return "it rests on per-tensor norms alone (no sketches, no two stored checkpoints)"
    return ""


FLOATING = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
BUFFER_SHARE = 0.2  # moved buffers holding more of the floating-point coordinates than this: continuity warns


Layout = dict[str, tuple[tuple[int, ...], str]]  # tensor name → (shape, safetensors dtype)


def _buffers_changed(view: RunView, bounds: Bounds) -> set[str]:
    """Buffers outside every optimizer group whose digest differs between consecutive points where
    the ledger holds the full digests (the init, each checkpoint entry, the last step's entry when it
    carries them; other step entries are not decoded for this): a buffer replaced by another of the
    same norm changes no norm, and the sketches leave buffers out (``count-sketch/v2``)."""
    order = view.tensor_order
    exempt = [n for i, n in enumerate(order) if not bounds.watched[i]]
    if not exempt or view.digest_scheme != TENSOR_V1:  # checkpoint entries hold tensor/v1 digests
        return set()
    points = [(-1, 0, dict(view.init.tensor_digests))]
    points += [(cp.step, 1, dict(cp.body.tensor_digests)) for cp in view.checkpoints if not cp.superseded]
    steps = view.steps.columns.steps  # ascending
    last = view.steps.get(int(steps[-1])) if len(steps) else None
    if last is not None and last.tensor_digests is not None and len(last.tensor_digests) == 32 * len(order):
        points.append((int(steps[-1]), 0, {n: last.tensor_digests[32 * i:32 * (i + 1)] for i, n in enumerate(order)}))
    points.sort(key=lambda p: p[:2])
    changed: set[str] = set()
    for (_, _, before), (_, _, after) in zip(points, points[1:], strict=False):
        changed |= {n for n in exempt if n in before and n in after and before[n] != after[n]}
    return changed


def _share(view: RunView, walk: _Walk, names: list[str]) -> float:
    """The share of the fingerprinted floating-point coordinates that ``names`` hold: by the shapes
    and dtypes of the real tensors read (a checkpoint, ``--model``), else as genesis states them."""
    claimed = view.genesis.layouts()
    layout = {n: walk.layout.get(n) or claimed.get(n, ((), None)) for n in view.tensor_order}
    floating = {n: math.prod(shape) for n, (shape, dtype) in layout.items() if dtype in FLOATING}
    total = sum(floating.values())
    return sum(floating.get(n, 0) for n in names) / total if total else 0.0


def _layout_problem(view: RunView, bounds: Bounds, walk: _Walk, real: Layout, step: int, what: str) -> None:
    """Real tensors' shapes and dtypes against genesis's architecture, whose sizes and dtypes the
    update bounds are built from (a size or a rounding the trainer inflated would loosen them): an
    anomaly at ``step`` when a tensor the bounds cover differs. Buffers outside every group are not
    bounded (a buffer may take its shape at the first forward, as quantisation observers do): their
    real layout only counts in :func:`_share`."""
    claimed = view.genesis.layouts()
    wrong = [n for i, n in enumerate(view.tensor_order)
             if n in real and bounds.watched[i] and claimed.get(n) != real[n]]
    walk.layout.update(real)
    if wrong:
        walk.anomalies.append({"step": step, "ratio": math.inf, "evidence": "fingerprint",
                               "detail": f"{what} tensor shapes or dtypes are not those genesis states ({len(wrong)} "
                                         f"tensor(s): {', '.join(wrong[:5])}), which the update bounds use"})


def _header_layout(path: Path) -> Layout | None:
    """Each tensor's shape and dtype from a safetensors file's header (or every shard of an index);
    None when it cannot be read (the checks that read the file say why)."""
    from ledger._fingerprint import read_shards
    from ledger.errors import ConfigurationError, FormatError

    try:
        return {name: (tuple(e.shape), e.dtype) for shard in read_shards(path) for name, e in shard.entries.items()}
    except (FormatError, ConfigurationError, OSError):
        return None


class _Walk:
    """One pass over the recorded steps: norm and sketch evidence, series for the plots."""

    def __init__(self, view: RunView, bounds: Bounds, lr_cap: np.ndarray | None = None) -> None:
        self.view, self.bounds, self.lr_cap = view, bounds, lr_cap
        self.unconfirmed: list[tuple[int, float, float]] = []  # (step, logged lr, ratio at the checkpoints' lr)
        self.anomalies: list[dict[str, Any]] = [{"step": -1, "ratio": math.inf, "evidence": "entry", "detail": why}
                                                for why in view.malformed_of(Kind.STEP, Kind.RESUME)]
        self.margin: float | None = None  # the largest ratio of an update within its bound
        self.notes: list[str] = []
        self.series: dict[str, np.ndarray | list[float]] = {"steps": [], "moved": [], "bound": [], "ratio": []}
        self.distance: list[list[float]] = []
        self.sketch_checks = self.sketch_skipped = self.sketch_nan = 0
        self.unchecked: list[str] = []  # tensors whose norm stays infinite: their updates are not checked
        self.layout: Layout = {}  # the real shapes and dtypes seen (stored checkpoints, --model)
        self.sketched: set[int] = set()  # the steps of the sketches checked against the bound
        self.buffers_moved: list[str] = []
        self.checkpoint_distances: list[dict[str, Any]] = []

    def fits(self, ratio: float) -> None:
        """An update within its bound at this ratio (the margin is the largest)."""
        self.margin = ratio if self.margin is None else max(self.margin, ratio)

    def run(self) -> None:
        """Walk every recorded step in order."""
        view = self.view
        if not view.recorded:
            return
        rtol = norm_rtol(view)
        rounding = dtype_rounding(view)
        jl = 1 + 3 / math.sqrt(view.policy.sketch_k)
        order = view.tensor_order
        moved_buffers: set[str] = set()
        with np.errstate(invalid="ignore"):  # a buffer holding ±inf (a causal mask): inf − inf is no movement
            self._steps(rtol, rounding, jl, order, moved_buffers)
        self.buffers_moved = sorted(moved_buffers)

    def _steps(self, rtol: np.ndarray, rounding: np.ndarray, jl: float, order: list[str],
               moved_buffers: set[str]) -> None:
        """Every step's norms against its bound, all steps at once (rows × tensors); the sketch
        budget summed step by step between sketches."""
        view, bounds, cols = self.view, self.bounds, self.view.steps.columns
        steps, norms = cols.steps, cols.norms
        if not len(steps):
            return
        prev = np.vstack([view.init.norms[None, :], norms[:-1]])
        bound = bounds.run(cols, prev)
        top = np.maximum(norms, prev)
        slack = (rtol + rounding * np.maximum(cols.optimizer_steps, 1)[:, None]) * top + 1e-12
        delta = np.abs(norms - prev)
        moved = delta > slack
        outside, unbounded = bounds.group_of < 0, ~np.isfinite(bound)
        checked = moved & ~unbounded
        ratio = np.where(checked, delta / (np.where(unbounded, 1.0, bound) + slack), 0.0)
        found: list[tuple[int, int, int, dict[str, Any]]] = []  # (row, evidence order, tensor, anomaly)
        expected = np.concatenate([[0], steps[:-1] + 1])
        for row in np.flatnonzero(steps != expected).tolist():
            found.append((row, 0, 0, {"step": int(steps[row]), "ratio": math.inf, "evidence": "steps",
                                      "detail": f"steps {int(expected[row])}…{int(steps[row]) - 1} are missing"}))
        for row, i in zip(*np.nonzero(outside & moved & bounds.parameter), strict=True):
            found.append((int(row), 1, int(i), {"step": int(steps[row]), "ratio": math.inf, "evidence": "norms",
                                                "tensor": order[i],
                                                "detail": "a parameter in no recorded optimizer group moved"}))
        moved_buffers.update(order[i] for i in np.flatnonzero((outside & moved & ~bounds.parameter).any(axis=0)))
        # NaN compares as "not moved": a logged NaN (or a change to or from an infinity) would hide any
        # jump of a tensor the optimizer bounds, or of any parameter, whatever genesis calls it (only
        # buffers outside every group are exempt); an infinity that stays is not checked and is named
        watched = bounds.watched
        blind = ~(np.isfinite(norms) & np.isfinite(prev))
        unknown = blind & ((norms != prev) | np.isnan(norms)) & watched
        for i in np.flatnonzero(unknown.any(axis=0)).tolist():
            rows = np.flatnonzero(unknown[:, i])
            why = (f"the norm, or the one before, is NaN or an infinity that changed ({len(rows)} step(s) from here): "
                   "the update cannot be bounded (weights that became NaN, or a logged NaN)")
            found.append((int(rows[0]), 1, i, {"step": int(steps[rows[0]]), "ratio": math.inf, "evidence": "norms",
                                               "tensor": order[i], "detail": why}))
        self.unchecked = [order[i] for i in np.flatnonzero((blind & ~unknown & watched).any(axis=0)).tolist()]
        # the sketches leave out what genesis names in sketch_skips: only buffers outside every group may be,
        # else a tensor the bound covers (or a parameter) could move inside the sketches' blind spot
        skipped = np.isin(np.asarray(order, dtype=object), list(view.policy.sketch_skips))
        for i in np.flatnonzero(skipped & watched).tolist():
            found.append((0, 1, i, {"step": int(steps[0]), "ratio": math.inf, "evidence": "sketch", "tensor": order[i],
                                    "detail": "genesis leaves a tensor of an optimizer group, or a parameter, out of "
                                              "every sketch (fingerprints.sketch_skips): only buffers may be"}))
        if "sgd" in bounds.group_family:  # SGD's bound is built from the step's gradient norms
            for row in np.flatnonzero(~cols.has_grad_norms & (cols.optimizer_steps > 0)).tolist():
                found.append((row, 1, 0, {"step": int(steps[row]), "ratio": math.inf, "evidence": "entry",
                                          "detail": "no gradient norms: the SGD update bound cannot be formed"}))
        self._confirm_lr(steps, bound, delta, slack, checked)
        has_bound = (~unbounded).any(axis=1)
        worst = np.argmax(np.where(unbounded, -np.inf, ratio), axis=1)
        worst_ratio = ratio[np.arange(len(steps)), worst]
        over = has_bound & (worst_ratio > 1)
        for row in np.flatnonzero(over).tolist():
            what = {"detail": "weights moved at a step where the optimizer took no step"} \
                if cols.optimizer_steps[row] == 0 else {}
            found.append((row, 2, 0, {"step": int(steps[row]), "ratio": float(worst_ratio[row]), "evidence": "norms",
                                      "tensor": order[int(worst[row])], **what}))
        honest = has_bound & ~over
        finite = ~unbounded
        self.series["steps"] = steps
        self.series["moved"] = np.where(finite, delta, 0.0).sum(axis=1)
        self.series["bound"] = np.where(finite, bound, 0.0).sum(axis=1)
        self.series["ratio"] = np.where(has_bound, np.where(finite, ratio, -np.inf).max(axis=1), 0.0)
        budgets = np.sqrt(np.square(np.where(finite, bound + slack, 0.0)).sum(axis=1)).tolist()
        # a tensor outside every param group (e.g. BatchNorm running statistics) that moved has no
        # bound, so the sketch interval holding that step cannot be checked as a whole, unless the
        # sketches leave it out (sketch_skips: the recorder leaves out every buffer)
        loose = (unbounded & moved & ~skipped).any(axis=1).tolist()
        sketch_ratios = self._sketches(cols, budgets, loose, jl, found)
        for r in ([float(worst_ratio[honest].max())] if honest.any() else []) + [r for _, r in sketch_ratios]:
            self.fits(r)
        found.sort(key=lambda f: f[:3])
        self.anomalies += [a for *_, a in found]

    def _sketches(self, cols: StepColumns, budgets: list[float], loose: list[bool], jl: float,
                  found: list[tuple[int, int, int, dict[str, Any]]]) -> list[tuple[int, float]]:
        """Each sketch against the bounds summed since the previous one; returns (row, ratio) of
        those that fit."""
        view, init = self.view, self.view.init.sketch
        sketch_at, sketch_prev, start = -1, init, 0
        fits: list[tuple[int, float]] = []
        for row, sketch in cols.sketches.items():
            budget = 0.0
            for b in budgets[start:row + 1]:
                budget += b
            unbounded = any(loose[start:row + 1])
            s = int(cols.steps[row])
            # slots holding ±inf or NaN (a buffer holding ±inf) are left out: the distance over the others
            # is at most the whole one, so an honest interval still fits; none left: no evidence
            usable = np.isfinite(sketch) & np.isfinite(sketch_prev)
            r = float(np.linalg.norm((sketch - sketch_prev)[usable])) / (jl * budget + 1e-12) if usable.any() \
                else math.nan
            if math.isnan(r):  # it bounds nothing and is not counted as evidence; the interval runs on to
                self.sketch_nan += 1  # the next sketch from the last one that could be compared
                continue
            if unbounded or self.bounds.family is None:
                self.sketch_skipped += 1
            elif r > 1:
                found.append((row, 3, 0, {"step": s, "ratio": r, "evidence": "sketch", "since_step": sketch_at}))
                self.sketched.add(s)
            else:
                fits.append((row, r))
                self.sketch_checks += 1
                self.sketched.add(s)
            self.distance.append([s, float(np.linalg.norm(sketch - view.init.sketch))])
            sketch_at, sketch_prev, start = s, sketch, row + 1
        return fits

    def _confirm_lr(self, steps: np.ndarray, bound: np.ndarray, delta: np.ndarray, slack: np.ndarray,
                    checked: np.ndarray) -> None:
        """Would each step fit the bound at the largest learning rate a stored checkpoint holds? (The
        bound is proportional to the learning rate.)"""
        cap, lrs = self.lr_cap, self.bounds.lrs
        if cap is None or len(cap) != lrs.shape[1]:
            return
        rows = np.flatnonzero(np.any(lrs > cap * (1 + 1e-9), axis=1))
        if not len(rows):
            return
        group = np.maximum(self.bounds.group_of, 0)
        lrs = lrs[rows]
        scale = np.where(self.bounds.group_of >= 0,
                         np.minimum(1.0, cap[group] / np.where(lrs > 0, lrs, 1.0)[:, group]), 1.0)
        capped = np.where(checked[rows], delta[rows] / (bound[rows] * scale + slack[rows]), 0.0)
        if not capped.shape[1]:
            return
        top = capped.max(axis=1)
        for row, lr, ratio in zip(rows[top > 1].tolist(), lrs[top > 1].max(axis=1).tolist(), top[top > 1].tolist(),
                                  strict=True):
            self.unconfirmed.append((int(steps[row]), float(lr), float(ratio)))


def _describe(anomaly: dict[str, Any]) -> str:
    evidence = anomaly["evidence"]
    if evidence in ("steps", "fingerprint", "entry", "final", "hyperparameters"):
        return f"step {anomaly['step']}: {anomaly['detail']}" if anomaly["step"] != -1 or evidence != "entry" \
            else anomaly["detail"]
    where = f" ({anomaly['tensor']})" if "tensor" in anomaly else ""
    if anomaly.get("detail"):
        return f"step {anomaly['step']}: {anomaly['detail']}{where}"
    span = f" since step {anomaly['since_step']}" if "since_step" in anomaly else ""
    if evidence == "checkpoint":
        return (f"steps {anomaly['from_step'] + 1}…{anomaly['step']}: real weights moved {anomaly['ratio']:.3g}× "
                f"the {anomaly.get('rule', 'per-coordinate')} bound{where}")
    return f"step {anomaly['step']}: {evidence} moved {anomaly['ratio']:.3g}× the bound{where}{span}"


# ----------------------------------------------------------------------------- stored checkpoints
def _check_checkpoints(view: RunView, bounds: Bounds, walk: _Walk, metas: dict[int, dict[str, Any]]) -> int:
    """Between consecutive stored checkpoints, the real weights against the summed bound (per
    coordinate for Adam/AdamW, per group in L2 for SGD); at each, the logged sketch, norms and
    hyperparameters against what the checkpoint holds. The weights are streamed: two checkpoint
    files open at once, read tensor by tensor in chunks (memory O(chunk), whatever the model's
    size). Returns the intervals checked."""
    previous: tuple[int, TensorFile] | None = None
    intervals = 0
    try:
        for cp in view.stored_checkpoints():
            current = TensorFile(checkpoint_file(cp.directory, FILES[0]))
            try:
                intervals += _check_checkpoint(view, bounds, walk, metas[cp.seq], cp, current, previous)
            except BaseException:
                current.close()
                raise
            if previous is not None:
                previous[1].close()
            previous = (cp.step, current)
    finally:
        if previous is not None:
            previous[1].close()
    return intervals


def _check_checkpoint(view: RunView, bounds: Bounds, walk: _Walk, meta: dict[str, Any], cp: Checkpoint,
                      weights: TensorFile, previous: tuple[int, TensorFile] | None) -> int:
    """One stored checkpoint (:func:`_check_checkpoints`) and the interval from ``previous`` to it,
    in one pass over its weights; returns the intervals checked (0 or 1)."""
    real = weights.layout()
    _layout_problem(view, bounds, walk, real, cp.step, "the checkpoint's")
    logged = view.steps.get(cp.step)
    sketch = view.init.sketch if cp.step == -1 else logged.sketch if logged else None
    norms = view.init.norms if cp.step == -1 else logged.norms if logged else None
    interval = None
    if previous is not None:
        steps = view.steps.columns.steps
        rows = np.arange(np.searchsorted(steps, previous[0] + 1), np.searchsorted(steps, cp.step, side="right"))
        checked = bool(len(rows)) and any(f is not None for f in bounds.group_family)
        interval = _Interval(bounds, rows, dtype_rounding(view), checked)
    sketcher = NumpySketch.of(view.policy) if sketch is not None else None
    found = _stream(view.tensor_order, previous[1] if previous is not None else None, weights, sketcher, interval)
    for problem in logged_problems(found, sketch, norms, norm_rtol(view)):
        walk.anomalies.append({"step": cp.step, "ratio": math.inf, "evidence": "fingerprint",
                               "detail": f"{problem} the checkpoint's weights"})
    if cp.step >= 0:
        walk.anomalies += _hyper_problems(view, bounds, cp.step, meta)
    walk.anomalies += _membership_problems(bounds, cp.step, meta, real, cp.directory)
    if previous is None or interval is None:
        return 0
    walk.checkpoint_distances.append({"from_step": previous[0], "to_step": cp.step, **interval.distance.result()})
    if not interval.checked:
        return 0
    worst, name, rule = interval.result()
    if worst > 1:
        walk.anomalies.append({"step": cp.step, "from_step": previous[0], "ratio": worst, "evidence": "checkpoint",
                               "tensor": name, "rule": rule})
    else:
        walk.fits(worst)
    return 1


def _stream(order: list[str], before: TensorFile | None, after: TensorFile, sketcher: NumpySketch | None,
            interval: _Interval | None) -> Fingerprint | None:
    """One pass over the tensors of ``order`` in ``after``: their (norms, sketch — with a
    ``sketcher``), None when one is missing; each chunk also goes to ``interval`` beside the same
    chunk of ``before`` (when it holds the tensor in the same shape; a shape genesis does not state
    is the layout check's)."""
    found = Fingerprints(sketcher)
    for i, name in enumerate(order):
        if name not in after.entries:
            continue
        chunks: Iterable[np.ndarray] = after.chunks(name)
        old = before.entries.get(name) if before is not None else None
        if interval is not None and before is not None and old is not None and old.shape == after.entries[name].shape:
            chunks = interval.follow(i, name, before.chunks(name), chunks)
        found.take(name, chunks)
    return found.result(order)


def file_problems(view: RunView, path: Path, step: int) -> list[str]:
    """How the norms and sketch logged at ``step`` disagree with the tensors of a safetensors file
    (or sharded index), read in one bounded pass (memory O(a chunk), whatever its size); each phrase
    to be followed by what the file is."""
    from ledger._weights import file_fingerprints

    body = view.steps[step]
    sketcher = NumpySketch.of(view.policy) if body.sketch is not None else None
    return logged_problems(file_fingerprints(path, view.tensor_order, sketcher), body.sketch, body.norms,
                           norm_rtol(view))


def logged_problems(real: Fingerprint | None, sketch: np.ndarray | None,
                    norms: np.ndarray | None, rtol: np.ndarray) -> list[str]:
    """How logged fingerprints (sketch, norms) disagree with the (norms, sketch) of real weights,
    computed in one bounded pass over their file (:func:`_stream`,
    :func:`ledger._weights.file_fingerprints`; None: tensors of the ledger are missing there), each
    phrase to be followed by what the weights are ("the checkpoint's weights")."""
    if real is None:
        return ["tensors of the ledger are missing from"]
    real_norms, real_sketch = real
    problems: list[str] = []
    with np.errstate(invalid="ignore", over="ignore"):  # inf − inf (a tensor holding ±inf) is handled below
        if sketch is not None and real_sketch is not None:  # ±inf in a tensor puts ±inf (or NaN, both signs
            # in a slot) in both sketches, at the same slots: those must be the same, the rest close
            finite = np.isfinite(real_sketch) & np.isfinite(sketch)
            if not np.array_equal(real_sketch[~finite], sketch[~finite], equal_nan=True) or float(np.linalg.norm(
                    real_sketch[finite] - sketch[finite])) > SKETCH_RTOL * max(float(np.linalg.norm(sketch[finite])),
                                                                              1e-12):
                problems.append("the logged sketch does not match")
        if norms is not None:  # an infinite norm matches an infinite one, or a real norm past what a float32
            # sum of squares holds (the recorder's blocks overflow: a buffer of finfo.min); NaN matches nothing
            overflow = np.isposinf(norms) & (real_norms >= FLOAT32_SQUARES)
            close = np.isfinite(norms) & (np.abs(real_norms - norms) <= rtol * np.maximum(norms, real_norms) + 1e-12)
            if not np.all((real_norms == norms) | overflow | close):
                problems.append("the logged norms do not match")
    return problems


def _membership_problems(bounds: Bounds, step: int, meta: dict[str, Any], real: Layout,
                         directory: Path) -> list[dict[str, Any]]:
    """Genesis's optimizer groups (which tensors each holds: each group's bound and learning rate)
    against the optimizer state a checkpoint holds: as many parameters in each group, and each
    per-parameter state tensor (Adam's moments, SGD's momentum) of the shape of the tensor genesis
    puts at that place. A tensor moved into a group of a larger learning rate would loosen its bound."""
    stored = meta.get("param_groups")
    if not isinstance(stored, list) or len(stored) != len(bounds.groups):
        return []  # _hyper_problems and the checkpoints check speak for a state that does not fit
    counts = meta.get("optimizer_groups", [len(stored)])
    wrong = _indexing_problems(stored, counts)
    shapes_at: dict[str, set[tuple[int, ...]]] = {}  # "<k.>index" → the shapes of its state tensors
    for key, (shape, _) in (_header_layout(checkpoint_file(directory, FILES[1])) or {}).items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "state" and shape:  # Adam's step count is a scalar: left out
            shapes_at.setdefault(parts[1], set()).add(shape)
    several = not wrong and len(counts) > 1
    owners = [] if wrong else [k for k, n in enumerate(counts) for _ in range(n)]
    for g, (claimed, held) in enumerate(zip(bounds.groups, stored, strict=True)):
        if wrong:
            break
        names, params = claimed.get("tensors", []), held["params"]
        if len(params) != len(names):
            wrong.append(f"group {g} holds {len(params)} tensor(s), genesis names {len(names)}")
            continue
        if bounds.group_family[g] not in ("adam", "adamw", "sgd"):  # others may keep factored state (Adafactor)
            continue
        prefix = f"{owners[g]}." if several else ""
        for index, name in zip(params, names, strict=True):
            shapes = shapes_at.get(f"{prefix}{index}")
            if name in real and shapes and real[name][0] not in shapes:
                wrong.append(f"group {g}'s state at {name} has the shape of another tensor")
    detail = f"the checkpoint's optimizer state does not hold the groups genesis states: {'; '.join(wrong[:3])}"
    return [{"step": step, "ratio": math.inf, "evidence": "optimizer groups", "detail": detail}] if wrong else []


def _indexing_problems(stored: list[Any], counts: Any) -> list[str]:
    """What in a checkpoint's ``param_groups`` and ``optimizer_groups`` is not as torch writes them:
    per optimizer, its groups' ``params`` are the distinct integers 0…n−1 (a crafted state could
    otherwise name indices no state tensor has, and escape the shape comparison)."""
    if not isinstance(counts, list) or not all(type(n) is int and n >= 0 for n in counts) \
            or sum(counts) != len(stored):
        return ["'optimizer_groups' does not count its param groups"]
    start = 0
    for k, n in enumerate(counts):
        groups = stored[start:start + n]
        start += n
        if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            return [f"optimizer {k}'s param groups hold no 'params' list"]
        indices = [i for g in groups for i in g["params"]]
        if not all(type(i) is int for i in indices) or sorted(indices) != list(range(len(indices))):
            return [f"optimizer {k}'s parameter indices are not 0…{len(indices) - 1}, each once"]
    return []


def _hyper_problems(view: RunView, bounds: Bounds, step: int, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The optimizer hyperparameters a checkpoint holds against those the ledger logs for its step:
    the learning rate (that of step s or, after a scheduler step, s+1) and betas, momentum, weight
    decay and eps in force."""
    stored = meta.get("param_groups")
    # after step s a checkpoint holds the values of step s, or of step s+1 once a scheduler stepped;
    # after the last step those next values are logged nowhere, so they cannot be compared
    in_force = [bounds.groups_at[s] for s in (step, step + 1) if s in bounds.groups_at]
    if not isinstance(stored, list) or step + 1 not in view.steps or not in_force:
        return []
    groups = in_force[0]
    problems: list[dict[str, Any]] = []

    def fail(detail: str) -> None:
        problems.append({"step": step, "ratio": math.inf, "evidence": "hyperparameters", "detail": detail})

    if len(stored) != len(groups):
        fail(f"the checkpoint holds {len(stored)} param groups, the ledger {len(groups)}")
        return problems
    logged = [view.steps[s].lrs for s in _lr_steps(step, meta)]
    for g, held in enumerate(stored):
        if not isinstance(held, dict):
            fail(f"param group {g} of the checkpoint is unreadable")
            continue
        lr = held.get("lr")
        candidates = [float(lrs[g]) for lrs in logged if lrs is not None and g < len(lrs)]
        if isinstance(lr, (int, float)) and candidates and all(float(lr) != c for c in candidates):
            fail(f"group {g}: the checkpoint holds lr {float(lr)!r}, the ledger logs "
                 f"{' / '.join(repr(c) for c in candidates)}")
        for key in HYPER_KEYS:
            claims = [_plain(groups[g][key]) for groups in in_force if g < len(groups) and key in groups[g]]
            if key in held and claims and all(_plain(held[key]) != c for c in claims):
                fail(f"group {g}: the checkpoint holds {key} {_plain(held[key])!r}, the ledger "
                     f"{' / '.join(repr(c) for c in claims)}")
    return problems


def _lr_steps(step: int, meta: dict[str, Any]) -> tuple[int, ...]:
    """Whose learning rate a checkpoint after step s holds: step s+1's when the recorded scheduler has
    stepped s+1 times (``last_epoch``), step s's when s times; without a recorded scheduler either (a
    loop may set the lr before or after recording), which leaves a forged lr right next to a
    checkpoint to replay."""
    scheduler = meta.get("scheduler")
    epoch = scheduler.get("last_epoch") if isinstance(scheduler, dict) else None
    if epoch == step + 1:
        return (step + 1,)
    if epoch == step:
        return (step,)
    return step, step + 1


def _plain(value: Any) -> Any:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else \
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class _Interval:
    """The real weights' move between two stored checkpoints against the bound summed over the
    interval's steps (``rows``), taken chunk by chunk of each tensor (:meth:`follow`): per coordinate
    for Adam/AdamW, in L2 per group for SGD, unmoved for a parameter in no group; and the distance
    between the states. ``checked``: the bound applies (steps in between, a known family)."""

    def __init__(self, bounds: Bounds, rows: np.ndarray, rounding: np.ndarray, checked: bool) -> None:
        self.bounds, self.rows, self.rounding, self.checked = bounds, rows, rounding, checked
        self.distance = Distance()
        self.opt_steps = int(bounds.steps[rows].sum())
        self.worst, self.worst_name, self.rule = 0.0, "", "per-coordinate"
        self.frozen_moved = ""  # the first parameter in no group that moved
        self.group_sums: dict[int, tuple[float, float]] = {}  # Adam: the group's Σ α·B and Σ α·λ, in step order
        self.group_moves: dict[int, float] = {}  # SGD: squared L2 of the move, per group
        self.group_rounding: dict[int, float] = {}  # squared L2 of the stored weights' rounding, per group
        self.group_eps: dict[int, float] = {}

    def follow(self, i: int, name: str, before: Iterator[np.ndarray],
               after: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """``after``'s chunks of tensor ``i`` of the order, passed on, each compared with the same
        chunk of ``before``: in runs on every CPU, folded in order."""
        g = int(self.bounds.group_of[i])
        if self.checked and g >= 0 and self.bounds.group_family[g] in ("adam", "adamw") and g not in self.group_sums:
            rows = self.rows
            self.group_sums[g] = (sum(self.bounds.coef[rows, g].tolist()), sum(self.bounds.decay[rows, g].tolist()))
        for new in after:
            old = next(before)
            for part in map_runs(functools.partial(self._part, i, old, new), 0, len(new)):
                self._fold(i, name, *part)
            yield new

    def _part(self, i: int, before: np.ndarray, after: np.ndarray, lo: int,
              hi: int) -> tuple[float, float, float, float]:
        """For coordinates [lo, hi) of a chunk of tensor ``i``: the sum of squares and the largest of
        their moves, their largest ratio to the per-coordinate bound (Adam), their rounding slack
        squared (SGD)."""
        old, new = before[lo:hi], after[lo:hi]
        moved, squares = moves(old, new)  # |new − old|, 0 where an infinity stayed (not NaN)
        largest = float(moved.max())
        g = int(self.bounds.group_of[i])
        kind = self.bounds.group_family[g] if g >= 0 else None
        if not self.checked or kind not in ("adam", "adamw", "sgd"):
            return squares, largest, 0.0, 0.0
        top = np.abs(old)
        np.maximum(top, np.abs(new), out=top)
        rounding = self.opt_steps * float(self.rounding[i])
        if kind == "sgd":  # each stored coordinate is rounded once per update: up to rounding × |w| each, in L2
            # over the group; over the coordinates that moved (‖Δ_S‖ ≤ ‖u‖ + ‖e_S‖): one that stayed needs none
            np.copyto(top, 0.0, where=moved == 0)
            return squares, largest, 0.0, rounding * rounding * float(np.dot(top, top))
        a, decay = self.group_sums[g]
        limit = top  # a + decay·(top + a) + rounding·(top + a), with top = max(|old|, |new|); in place
        with np.errstate(invalid="ignore"):  # inf · 0 over steps without an update: handled below
            limit += a
            limit *= decay + rounding
            limit += a
            limit *= 1 + 1e-9
            limit += 1e-12
            ratio = float(np.divide(moved, limit, out=limit).max())
        if math.isnan(ratio):  # a coordinate that did not move fits any limit (0 / (inf · 0) is NaN: an infinity
            limit[moved == 0] = 0.0  # that stayed over steps without an update); one that came or went, or a NaN,
            ratio = float(limit.max())  # fits none
        return squares, largest, math.inf if math.isnan(ratio) else ratio, 0.0

    def _fold(self, i: int, name: str, squares: float, largest: float, ratio: float, rounding: float) -> None:
        self.distance.add(squares, largest)
        bounds = self.bounds
        g = int(bounds.group_of[i])
        if not self.checked or (g < 0 and not bounds.parameter[i]):
            return
        if g < 0:
            if not self.frozen_moved and largest != 0:  # NaN too
                self.frozen_moved = name
            return
        if bounds.group_family[g] == "sgd":
            self.group_moves[g] = self.group_moves.get(g, 0.0) + squares
            self.group_rounding[g] = self.group_rounding.get(g, 0.0) + rounding
            self.group_eps[g] = max(self.group_eps.get(g, 0.0), float(self.rounding[i]))
        elif ratio > self.worst:
            self.worst, self.worst_name, self.rule = ratio, name, "per-coordinate"

    def result(self) -> tuple[float, str, str]:
        """(largest ratio to the bound, its tensor, the rule)."""
        if self.frozen_moved:
            return math.inf, self.frozen_moved, "no-optimizer"
        worst, worst_name, rule = self.worst, self.worst_name, self.rule
        for g, squared in self.group_moves.items():
            # the update lr·g is itself rounded (relative eps) besides the weights it lands on
            budget = sum(self.bounds.sgd_totals[self.rows, g].tolist()) * (1 + 4 * self.group_eps[g] + 1e-9)
            budget += math.sqrt(self.group_rounding[g])
            ratio = math.sqrt(squared) / (budget + 1e-12) if squared else 0.0
            ratio = math.inf if math.isnan(ratio) else ratio  # a coordinate became or left ±inf, or is NaN
            if ratio > worst:
                worst, worst_name, rule = ratio, f"param group {g}", "group L2"
        return worst, worst_name, rule


# ----------------------------------------------------------------------------- the final state
def _check_final(ctx: Context, view: RunView, walk: _Walk) -> tuple[str, str]:
    """The seal's final weights against the state at the last step; returns (the evidence used,
    why it is weak), each "" when there is none."""
    seal = view.seal
    if seal is None or seal.final is None or not view.steps:
        return "", ""
    last, digests, where = view.last_state()
    sealed = seal.final.tensor_digests
    if digests is not None:
        differ = sorted(n for n in set(sealed) | set(digests) if sealed.get(n) != digests.get(n))
        if differ:
            walk.anomalies.append({"step": last, "ratio": math.inf, "evidence": "final",
                                   "detail": f"the sealed final weights are not the state at the last step ({where}): "
                                             f"{len(differ)} tensor(s) differ: {', '.join(differ[:5])}"})
        return f"the sealed weights equal {where}", ""
    if ctx.model is None:
        return "", (f"the sealed final weights are tied to nothing the verifier could check: no checkpoint or "
                    f"digests at the last step {last} (give --model to compare its norms and sketch)")
    body = view.steps[last]
    problems = file_problems(view, ctx.model, last)
    if problems:
        walk.anomalies.append({"step": last, "ratio": math.inf, "evidence": "final",
                               "detail": f"{' and '.join(problems)} the released weights ({ctx.model.name})"})
        return "the released weights against the last step's norms", ""
    what = "norms and sketch" if body.sketch is not None else "norms"
    return f"the released weights against step {last}'s {what}", (
        f"the final weights are tied to step {last} by its {what} only, which a forger can match "
        "(no checkpoint or digests there)")
