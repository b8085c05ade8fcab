"""``continuity``: every recorded update fits within what the optimizer can do.

Adam/AdamW move each coordinate by at most α·B_t (+ α·λ·|θ| for decoupled weight decay), with
B_t the finite-t form of the tight bound (1−β1)/√(1−β2)·1/√(1−β1²/β2) including bias correction
(docs/VERIFYING.md). SGD moves a group by at most α·Σ μ^j (‖g_{s−j}‖ + λ‖θ‖), from the logged
gradient norms. Evidence: per-tensor norms every step, sketches between sketched steps, and the
real weights of consecutive checkpoints (per coordinate). Sketches and norms are also checked
against the real weights wherever a checkpoint holds them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ledger._schema import StepBody
from ledger._state import read_weights
from ledger._weights import NumpySketch
from ledger.verify._context import Context
from ledger.verify._result import CheckResult, Status
from ledger.verify._run import RunView

NORM_RTOL = 1e-6  # float32 norms: relative rounding slack
SKETCH_RTOL = 1e-6  # sketch of the same weights, another summation order


def adam_bound(beta1: float, beta2: float, t: int) -> float:
    """max |m̂_t| / √v̂_t over all gradient sequences of length t (Cauchy–Schwarz, tight)."""
    r = beta1 * beta1 / beta2
    partial = t if r == 1 else (1 - r**t) / (1 - r)
    return (1 - beta1) / math.sqrt(1 - beta2) * math.sqrt(partial) * math.sqrt(1 - beta2**t) / (1 - beta1**t)


def _family(optimizer_class: str) -> str | None:
    name = optimizer_class.rsplit(".", 1)[-1]
    if name in ("AdamW",):
        return "adamw"
    if name in ("Adam",):
        return "adam"
    if name == "SGD":
        return "sgd"
    return None


class Bounds:
    """Per-step, per-tensor L2 bounds on the update, from the committed hyperparameters."""

    def __init__(self, view: RunView) -> None:
        self.family = _family(view.optimizer.class_name)
        self.groups = view.optimizer.param_groups
        order = view.tensor_order
        sizes = view.genesis.tensor_sizes()
        self.group_of = np.full(len(order), -1)
        index = {name: i for i, name in enumerate(order)}
        for g, group in enumerate(self.groups):
            for name in group.get("tensors", []):
                if name in index:
                    self.group_of[index[name]] = g
        self.sqrt_d = np.sqrt(np.array([sizes.get(n, 0) for n in order], dtype=np.float64))
        self.grad_history: list[np.ndarray] = []

    def step(self, s: int, lrs: np.ndarray, prev_norms: np.ndarray, grad_norms: np.ndarray | None) -> np.ndarray:
        """L2 bound on each tensor's update at step s (inf for tensors outside any group)."""
        bound = np.full(len(self.group_of), np.inf)
        for g, group in enumerate(self.groups):
            mask = self.group_of == g
            lr = float(lrs[g]) if g < len(lrs) else float(group["lr"])
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            if self.family in ("adam", "adamw"):
                beta1, beta2 = (float(b) for b in group["betas"])
                b = lr * adam_bound(beta1, beta2, s + 1) * self.sqrt_d[mask]
                if self.family == "adamw":
                    b = b + lr * wd * prev_norms[mask]
                bound[mask] = b * (1 + 1e-6)
            elif self.family == "sgd" and grad_norms is not None:
                mu = float(group.get("momentum", 0.0) or 0.0)
                theta = float(np.sqrt(np.square(prev_norms[mask]).sum()))
                history = [h[g] for h in self.grad_history] + [float(grad_norms[g])]
                total = sum(mu**j * (gn + wd * theta) for j, gn in enumerate(reversed(history)))
                if group.get("nesterov"):
                    total = (float(grad_norms[g]) + wd * theta) + mu * total
                bound[mask] = lr * total * (1 + 1e-6)
        if grad_norms is not None:
            self.grad_history.append(np.asarray(grad_norms, dtype=np.float64))
        return bound


def _lrs(body: StepBody, bounds: Bounds) -> np.ndarray:
    return body.lrs if body.lrs is not None else np.asarray([g["lr"] for g in bounds.groups], dtype=np.float64)


def check_continuity(ctx: Context) -> CheckResult:
    """Check every step's update against the optimizer bound (norms, sketches, checkpoints)."""
    view = ctx.view
    assert view is not None
    if not view.steps:
        return CheckResult("continuity", Status.SKIP, "no recorded steps with fingerprints to check")
    bounds = Bounds(view)
    if bounds.family is None:
        return CheckResult("continuity", Status.SKIP, f"no update bound is known for {view.optimizer.class_name}",
                           summary="optimizer without a known bound")
    k = view.policy.sketch_k
    jl = 1 + 3 / math.sqrt(k)
    init = view.init
    prev_norms = init.norms
    sketch_at, sketch_prev = -1, init.sketch
    series: dict[str, list[float]] = {"steps": [], "moved": [], "bound": [], "ratio": []}
    sketch_budget, sketch_unbounded, sketch_skipped = 0.0, False, 0
    anomalies: list[dict[str, Any]] = []
    ratios: list[float] = []
    distance_from_init: list[list[float]] = []
    expected = 0
    for s in sorted(view.steps):
        body = view.steps[s]
        if s != expected:
            anomalies.append({"step": s, "ratio": math.inf, "evidence": "steps",
                              "detail": f"steps {expected}…{s - 1} are missing"})
        expected = s + 1
        norms = body.norms
        bound = bounds.step(s, _lrs(body, bounds), prev_norms, body.grad_norms)
        slack = NORM_RTOL * np.maximum(norms, prev_norms) + 1e-12
        delta = np.abs(norms - prev_norms)
        ratio = delta / (bound + slack)
        worst = int(np.argmax(ratio))
        if ratio[worst] > 1:
            anomalies.append({"step": s, "ratio": float(ratio[worst]), "evidence": "norms",
                              "tensor": view.tensor_order[worst]})
        else:
            ratios.append(float(ratio[worst]))
        finite = np.isfinite(bound)
        series["steps"].append(s)
        series["moved"].append(float(delta[finite].sum()))
        series["bound"].append(float(bound[finite].sum()))
        series["ratio"].append(float((delta[finite] / (bound[finite] + 1e-12)).max()) if finite.any() else 0.0)
        sketch_budget += float(np.sqrt(np.square(bound[finite]).sum()))
        # a tensor outside every param group (e.g. BatchNorm running statistics) that moved has no
        # bound, so the sketch interval holding that step cannot be checked as a whole
        sketch_unbounded |= bool(np.any(~finite & (np.abs(norms - prev_norms) > slack)))
        if body.sketch is not None:
            sketch = body.sketch
            moved = float(np.linalg.norm(sketch - sketch_prev))
            r = moved / (jl * sketch_budget + 1e-12)
            if sketch_unbounded:
                sketch_skipped += 1
            elif r > 1:
                anomalies.append({"step": s, "ratio": r, "evidence": "sketch", "since_step": sketch_at})
            else:
                ratios.append(r)
            distance_from_init.append([s, float(np.linalg.norm(sketch - init.sketch))])
            sketch_at, sketch_prev, sketch_budget, sketch_unbounded = s, sketch, 0.0, False
        prev_norms = norms
    checked_intervals = _check_checkpoints(view, bounds, anomalies, ratios) if view.checkpoints else 0
    data: dict[str, Any] = {
        "steps_checked": len(view.steps), "anomalies": anomalies,
        "margin": max(ratios) if ratios else None, "superseded_steps": [s for _, s in view.superseded],
        "checkpoint_intervals_checked": checked_intervals,
        "distance_from_init": distance_from_init[:: max(1, len(distance_from_init) // 1000)],
        "optimizer_family": bounds.family, "sketch_intervals_skipped": sketch_skipped,
    }
    margin = f"largest honest ratio to the bound {max(ratios):.4f}" if ratios else "no ratios"
    superseded = f"; {len(view.superseded)} superseded step entries excluded" if view.superseded else ""
    if sketch_skipped:
        superseded += (f"; sketch evidence skipped for {sketch_skipped} interval(s) in which tensors outside the "
                       "optimizer (e.g. normalisation statistics) changed")
    plot = {**series, "family": bounds.family, "distance_from_init": distance_from_init}
    if anomalies:
        named = "; ".join(_describe(a) for a in anomalies[:6])
        return CheckResult("continuity", Status.FAIL, f"{len(anomalies)} update(s) exceed the {bounds.family} bound: "
                           f"{named}{' …' if len(anomalies) > 6 else ''}", data, series=plot)
    return CheckResult("continuity", Status.PASS, f"{len(view.steps)} steps within the {bounds.family} update bound "
                       f"(norms every step, sketches, {checked_intervals} checkpoint interval(s) per coordinate); "
                       f"{margin}{superseded}", data, series=plot)


def movement(view: RunView) -> dict[int, float]:
    """How far each step moved the weights, by the sum of per-tensor norm changes (what replay
    uses to pick the interval with the largest update)."""
    out, prev = {}, view.init.norms if view.recorded else None
    for s in sorted(view.steps):
        norms = view.steps[s].norms
        if prev is not None and norms.shape == prev.shape:
            out[s] = float(np.abs(norms - prev).sum())
        prev = norms
    return out


def _describe(anomaly: dict[str, Any]) -> str:
    if anomaly["evidence"] == "steps":
        return f"step {anomaly['step']}: {anomaly['detail']}"
    where = f" ({anomaly['tensor']})" if "tensor" in anomaly else ""
    span = f" since step {anomaly['since_step']}" if "since_step" in anomaly else ""
    if anomaly["evidence"] == "checkpoint":
        return (f"steps {anomaly['from_step'] + 1}…{anomaly['step']}: real weights moved {anomaly['ratio']:.3g}× "
                f"the per-coordinate bound{where}")
    if anomaly["evidence"] == "fingerprint":
        return f"step {anomaly['step']}: {anomaly['detail']}"
    return f"step {anomaly['step']}: {anomaly['evidence']} moved {anomaly['ratio']:.3g}× the bound{where}{span}"


def _check_checkpoints(view: RunView, bounds: Bounds, anomalies: list[dict[str, Any]],
                       ratios: list[float]) -> int:
    """Per-coordinate (L∞) bound between consecutive stored checkpoints, and the logged sketches
    and norms against the real weights (read with numpy: no torch needed)."""
    policy = view.policy
    sketcher = NumpySketch(policy.sketch_seed, policy.sketch_k)
    order = view.tensor_order
    position = {name: i for i, name in enumerate(order)}
    previous: tuple[int, dict[str, np.ndarray]] | None = None
    intervals = 0
    for cp in view.stored_checkpoints():
        weights = read_weights(cp.directory)
        logged = view.steps.get(cp.step)
        sketch = view.init.sketch if cp.step == -1 else logged.sketch if logged else None
        norms = view.init.norms if cp.step == -1 else logged.norms if logged else None
        if sketch is not None:
            real = sketcher({n: weights[n] for n in order if n in weights})
            if float(np.linalg.norm(real - sketch)) > SKETCH_RTOL * max(float(np.linalg.norm(sketch)), 1e-12):
                anomalies.append({"step": cp.step, "ratio": math.inf, "evidence": "fingerprint",
                                  "detail": "the logged sketch does not match the checkpoint's weights"})
        if norms is not None:
            real_norms = np.array([float(np.linalg.norm(weights[n].astype(np.float64).ravel())) if n in weights
                                   else math.nan for n in order])
            if not np.all(np.abs(real_norms - norms) <= 1e-5 * np.maximum(norms, 1e-12) + 1e-12):
                anomalies.append({"step": cp.step, "ratio": math.inf, "evidence": "fingerprint",
                                  "detail": "the logged norms do not match the checkpoint's weights"})
        if previous is not None and bounds.family in ("adam", "adamw"):
            t, before = previous
            steps = [s for s in range(t + 1, cp.step + 1) if s in view.steps]
            if steps:
                intervals += 1
                worst, worst_name = 0.0, ""
                for name in order:
                    g = int(bounds.group_of[position[name]])
                    if g < 0 or name not in weights or name not in before:
                        continue
                    group = bounds.groups[g]
                    beta1, beta2 = (float(b) for b in group["betas"])
                    wd = float(group.get("weight_decay", 0.0) or 0.0) if bounds.family == "adamw" else 0.0
                    lrs = [float(_lrs(view.steps[s], bounds)[g]) for s in steps]
                    a = sum(lr * adam_bound(beta1, beta2, s + 1) for lr, s in zip(lrs, steps, strict=True))
                    decay = wd * sum(lrs)
                    old, new = before[name].astype(np.float64), weights[name].astype(np.float64)
                    limit = a + decay * (np.maximum(np.abs(old), np.abs(new)) + a)
                    ratio = float((np.abs(new - old) / (limit * (1 + 1e-6) + 1e-12)).max()) if old.size else 0.0
                    if ratio > worst:
                        worst, worst_name = ratio, name
                if worst > 1:
                    anomalies.append({"step": cp.step, "from_step": t, "ratio": worst, "evidence": "checkpoint",
                                      "tensor": worst_name})
                else:
                    ratios.append(worst)
        previous = (cp.step, weights)
    return intervals
