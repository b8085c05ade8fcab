"""How far an optimizer can move the weights in one step, and how much rounding to allow.

Adam/AdamW move each coordinate by at most α·B_t (+ α·λ·|θ| for decoupled weight decay). By
Cauchy–Schwarz, |m̂_t|/√v̂_t ≤ √A_t · √(1−β2_t^t)/(1−β1_t^t) with A_t = (β1_t²/β2_t)·A_{t−1} +
(1−β1_t)²/(1−β2_t), A_0 = 0 — tight, and valid when a scheduler moves the betas between steps (torch's
bias corrections use the current betas); for constant betas it is the finite-t form of
(1−β1)/√(1−β2)·1/√(1−β1²/β2). When β1² > β2 it grows without limit (vacuous). SGD (torch semantics:
buf ← μ·buf + g + λθ, update α·buf, or α·(g + λθ + μ·buf) with Nesterov) moves a group by at most α·b_t with
b_t = μ·b_{t−1} + ‖g_t‖ + λ‖θ_{t−1}‖, from the logged gradient norms — each step's own ‖θ‖, not
today's. A step at which the optimizer took no step (``optimizer_steps`` 0) may move nothing; k
optimizer steps between two entries add k step bounds. Hyperparameters follow the ledger: genesis,
updated by each step's ``hyper`` (a scheduler moving betas or momentum).

Rounding: a logged norm is off by at most m·u₃₂ relative (m = the elements summed in float32: the
tensor for ledgers that logged float32 norms, at most one 65536-element block since norms are
accumulated blockwise in float64), and each optimizer step rounds a coordinate by u·|θᵢ| in the
parameter's dtype (u = 2⁻²⁴ float32, 2⁻⁸ bfloat16, 2⁻¹¹ float16).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from ledger.verify._columns import StepColumns
from ledger.verify._run import RunView

Floats = npt.NDArray[np.float64]
NORM_BLOCK = 1 << 16  # elements summed in float32 before the float64 accumulation (recorder norms)
BLOCKWISE_NORMS = "blocks of 65536"  # what genesis says of norms logged blockwise
U32 = 2.0 ** -24
ROUNDING = {"F64": 2.0 ** -53, "F32": U32, "BF16": 2.0 ** -8, "F16": 2.0 ** -11}
KNOWN = {"torch.optim.adamw.AdamW": "adamw", "torch.optim.adam.Adam": "adam", "torch.optim.sgd.SGD": "sgd"}


def family(class_name: str, mro: tuple[str, ...]) -> str | None:
    """"adam", "adamw" or "sgd" when the optimizer is (a subclass of) torch's, from its recorded
    base classes; ledgers without them are recognised by the class's own name."""
    for name in mro:
        if name in KNOWN:
            return KNOWN[name]
    if not mro:
        return {"AdamW": "adamw", "Adam": "adam", "SGD": "sgd"}.get(class_name.rsplit(".", 1)[-1])
    return None


def norm_rtol(view: RunView) -> Floats:
    """Per tensor: how far a logged norm may be from the exact one, relative."""
    sizes = view.genesis.tensor_sizes()
    n = np.array([sizes.get(name, 0) for name in view.tensor_order], dtype=np.float64)
    blockwise = BLOCKWISE_NORMS in view.policy.norms
    return (np.minimum(n, NORM_BLOCK) if blockwise else n) * U32 + U32


def dtype_rounding(view: RunView) -> Floats:
    """Per tensor: the relative rounding of one update in its dtype (0 for integers)."""
    tensors = view.genesis.tensors()
    return np.array([ROUNDING.get(str(tensors.get(name, {}).get("dtype")), 0.0) for name in view.tensor_order])


class Bounds:
    """Per-step, per-tensor L2 bounds on the update, from the hyperparameters in force; keeps what
    the per-coordinate check between checkpoints needs (``coef``: Σ α·B per group, ``decay``: Σ α·λ,
    ``steps``: optimizer steps, per recorded step)."""

    def __init__(self, view: RunView) -> None:
        optimizers = view.genesis.all_optimizers
        # each group's optimizer (several optimizers: their groups concatenated) and its family
        self.owner = [k for k, o in enumerate(optimizers) for _ in o.param_groups]
        self.families = [family(o.class_name, o.mro) for o in optimizers]
        self.group_family = [self.families[k] for k in self.owner]
        known = sorted({f for f in self.families if f is not None})
        self.family = None if None in self.families else "+".join(known) if len(known) > 1 else known[0]
        self.unknown = [o.class_name for o, f in zip(optimizers, self.families, strict=True) if f is None]
        self.groups: list[dict[str, Any]] = [dict(g) for o in optimizers for g in o.param_groups]
        # torch's Adam(decoupled_weight_decay=True) is AdamW's update rule
        self.group_family = ["adamw" if f == "adam" and g.get("decoupled_weight_decay") else f
                             for f, g in zip(self.group_family, self.groups, strict=True)]
        order = view.tensor_order
        self.group_of = np.full(len(order), -1)
        index = {name: i for i, name in enumerate(order)}
        for g, group in enumerate(self.groups):
            for name in group.get("tensors", []):
                if name in index:
                    self.group_of[index[name]] = g
        tensors = view.genesis.tensors()
        self.parameter = np.array([tensors.get(n, {}).get("kind", "parameter") == "parameter" for n in order])
        # what the bounds cover: tensors in a group, and every parameter (only buffers outside every
        # group are exempt, whatever moved them)
        self.watched = (self.group_of >= 0) | self.parameter
        sizes = view.genesis.tensor_sizes()
        self.sqrt_d = np.sqrt(np.array([sizes.get(n, 0) for n in order], dtype=np.float64))
        self.t = np.zeros(len(optimizers), dtype=np.int64)  # steps so far, per optimizer (Adam's step count)
        self.buffer = np.zeros(len(self.groups))  # SGD: bound on the momentum buffer's norm per group
        self.moments = np.zeros(len(self.groups))  # Adam: A_t per group
        # per row of the last columns given to :meth:`run`: Σ α·B and Σ α·λ per group, optimizer steps,
        # SGD's summed bound per group (inf where none), the learning rates in force (rows × groups)
        self.coef = self.decay = self.sgd_totals = self.lrs = np.zeros((0, len(self.groups)))
        self.steps = np.zeros(0, dtype=np.int64)
        self.groups_at: dict[int, list[dict[str, Any]]] = {}
        self.vacuous = False

    def run(self, columns: StepColumns, prev_norms: Floats) -> Floats:
        """L2 bound on each tensor's update at each row's step (rows × tensors; inf for tensors
        outside every group), given each row's previous norms; continues from the rows of an
        earlier call."""
        n, width = len(columns.steps), len(self.groups)
        each = np.zeros((n, len(self.t)), dtype=np.int64)  # optimizer steps per row and optimizer
        if len(self.t):
            each[:, 0] = columns.optimizer_steps
        self.steps = columns.optimizer_steps.copy()
        for row, ks in columns.each.items():
            each[row] = [int(k) for k in ks[:len(self.t)]] + [0] * (len(self.t) - min(len(ks), len(self.t)))
            self.steps[row] = sum(int(k) for k in ks)
        t0 = self.t + np.cumsum(each, axis=0) - each  # each optimizer's steps before the row
        self.coef, self.decay = np.zeros((n, width)), np.zeros((n, width))
        self.sgd_totals, self.lrs = np.full((n, width), np.inf), np.zeros((n, width))
        bound = np.full((n, len(self.group_of)), np.inf)
        for lo, hi in self._spans(columns):
            groups = self.groups
            for g, group in enumerate(groups):
                lr = np.where(columns.has_lrs[lo:hi], columns.lrs[lo:hi, g] if g < columns.lrs.shape[1] else math.nan,
                              float(group.get("lr", math.nan)))
                self.lrs[lo:hi, g] = lr
                self._group(g, group, lr, each[lo:hi, self.owner[g]], t0[lo:hi, self.owner[g]], columns, lo, hi,
                            prev_norms, bound)
        self.t += each.sum(axis=0)
        return bound

    def _spans(self, columns: StepColumns) -> Iterator[tuple[int, int]]:
        """Row spans with one set of hyperparameters, applying each row's ``hyper`` as it comes."""
        starts = sorted(columns.hyper)
        bounds = [0, *[r for r in starts if r > 0], len(columns.steps)]
        steps = columns.steps.tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            hyper = columns.hyper.get(lo)
            if hyper is not None:
                self.groups = [{**g, **h} for g, h in zip(self.groups, hyper, strict=False)] + self.groups[len(hyper):]
            self.groups_at.update(dict.fromkeys(steps[lo:hi], self.groups))
            if hi > lo:
                yield lo, hi

    def _group(self, g: int, group: dict[str, Any], lr: Floats, k: np.ndarray, t0: np.ndarray,
               columns: StepColumns, lo: int, hi: int, prev_norms: Floats, bound: Floats) -> None:
        """Group g's bounds over rows lo…hi−1 (one set of hyperparameters)."""
        mask = self.group_of == g
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        kind = self.group_family[g]
        if kind in ("adam", "adamw"):
            beta1, beta2 = (float(b) for b in group["betas"])
            self.vacuous |= beta1 * beta1 > beta2
            a, coef = float(self.moments[g]), self.coef[lo:hi, g]
            # A_t = (β1²/β2)·A_{t−1} + (1−β1)²/(1−β2), B_t = √A_t·√(1−β2^t)/(1−β1^t) per optimizer step
            decay_a, drive_a = beta1 * beta1 / beta2, (1 - beta1) ** 2 / (1 - beta2)
            if -1 < beta1 < 1 and 0 < beta2 < 1 and a >= 0 and len(k) and k.min() >= 0 \
                    and k.sum() <= 16 * len(k) + 4096:
                a = _adam_coef(a, int(t0[0]), k, lr, (beta1, beta2, decay_a, drive_a), coef)
            else:  # hyperparameters no torch Adam takes (a crafted genesis): the same sums, step by step
                sqrt = math.sqrt
                for row, (rate, steps, t) in enumerate(zip(lr.tolist(), k.tolist(), t0.tolist(), strict=True)):
                    c = 0.0
                    for j in range(t + 1, t + steps + 1):
                        a = decay_a * a + drive_a
                        c += rate * (sqrt(a) * sqrt(1 - beta2**j) / (1 - beta1**j))
                    coef[row] = c
            self.moments[g] = a
            self.decay[lo:hi, g] = lr * wd * k if kind == "adamw" else 0.0
            decay = self.decay[lo:hi, g, None]
            bound[lo:hi, mask] = coef[:, None] * self.sqrt_d[mask] + decay * prev_norms[lo:hi, mask]
        elif kind == "sgd":
            mu = float(group.get("momentum", 0.0) or 0.0)
            nesterov = bool(group.get("nesterov"))
            theta = np.sqrt(np.square(prev_norms[lo:hi, mask]).sum(axis=1))
            grads = columns.grad_norms[lo:hi, g] if g < columns.grad_norms.shape[1] else np.full(hi - lo, math.nan)
            drives = (grads + wd * theta).tolist()
            buffer, totals = float(self.buffer[g]), self.sgd_totals[lo:hi, g]
            has = columns.has_grad_norms[lo:hi].tolist()
            for row, (rate, steps, drive) in enumerate(zip(lr.tolist(), k.tolist(), drives, strict=True)):
                if not has[row]:
                    continue
                total = 0.0
                for _ in range(steps):
                    buffer = mu * buffer + drive if mu else drive
                    total += rate * (drive + mu * buffer if nesterov else buffer)
                totals[row] = total
            self.buffer[g] = buffer
            bound[lo:hi, mask] = np.where(np.asarray(has)[:, None], totals[:, None], np.inf)


def _adam_coef(a: float, t: int, k: np.ndarray, lr: Floats, betas: tuple[float, float, float, float],
               coef: Floats) -> float:
    """Adam's Σ α·B over each row's optimizer steps (``k[row]`` of them, numbered from ``t`` + 1 on,
    row after row) into ``coef``, from A = ``a``; returns A after the last step. The same floating-point
    operations, in the same order, as the step-by-step loop: A_j = (β1²/β2)·A_{j−1} + (1−β1)²/(1−β2)
    one step after another (once A_j equals A_{j−1} it stays so: every later step computes the same
    value), 1 − β^j as :func:`_one_minus_powers` gives it, then √A_j·√(1−β2^j)/(1−β1^j) per step and the
    row sums 0 + α·B_j, … elementwise (IEEE operations, which numpy rounds as Python does). Needs
    −1 < β1 < 1 and 0 < β2 < 1 (no division by zero, no square root of a negative) and every k ≥ 0."""
    beta1, beta2, decay_a, drive_a = betas
    total = int(k.sum())
    moments: list[float] = []
    for _ in range(total):
        following = decay_a * a + drive_a
        if following == a:
            break
        a = following
        moments.append(a)
    steps = range(t + 1, t + total + 1)
    with np.errstate(all="ignore"):  # inf and NaN as Python's floats give them, without numpy's warnings
        terms = np.sqrt(_then(moments, a, total)) * np.sqrt(_one_minus_powers(beta2, steps)) \
            / _one_minus_powers(beta1, steps)
        first = np.cumsum(k) - k  # each row's first step in ``terms``
        one = k == 1
        coef[one] = 0.0 + lr[one] * terms[first[one]]
        coef[k == 0] = 0.0
    for row in np.flatnonzero(k > 1).tolist():
        c, rate = 0.0, float(lr[row])
        for term in terms[first[row]:first[row] + k[row]].tolist():
            c += rate * term
        coef[row] = c
    return a


def _one_minus_powers(beta: float, steps: range) -> Floats:
    """1 − β^j for each j of ``steps`` (|β| < 1), each as Python computes ``1 - beta**j``. Once some
    |β^J| < 2⁻⁶⁰ the exact |β^j| of every j > J is smaller still, so any ``pow`` within 1 % of it stays
    below 2⁻⁵⁴ and 1 − β^j rounds to 1.0 exactly: those are not computed (J: about 60 / log2(1/|β|))."""
    cut = steps.start if beta == 0 else max(steps.start, math.ceil(-60 / math.log2(abs(beta))))
    while cut < steps.stop and abs(beta**cut) >= 2.0 ** -60:
        cut += 1 + cut // 64
    return _then([1 - beta**j for j in range(steps.start, min(cut, steps.stop))], 1.0, len(steps))


def _then(values: list[float], rest: float, size: int) -> Floats:
    """``values`` followed by ``rest`` up to ``size`` elements, as a float64 vector."""
    out = np.full(size, rest)
    out[:len(values)] = values
    return out
