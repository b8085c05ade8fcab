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
from typing import Any

import numpy as np
import numpy.typing as npt

from ledger._schema import StepBody
from ledger.verify._run import RunView

Floats = npt.NDArray[np.float64]
NORM_BLOCK = 1 << 16  # elements summed in float32 before the float64 accumulation (recorder norms)
BLOCKWISE_NORMS = "blocks of 65536"  # what genesis says of norms logged blockwise
U32 = 2.0 ** -24
ROUNDING = {"F64": 2.0 ** -53, "F32": U32, "BF16": 2.0 ** -8, "F16": 2.0 ** -11}
KNOWN = {"torch.optim.adamw.AdamW": "adamw", "torch.optim.adam.Adam": "adam", "torch.optim.sgd.SGD": "sgd"}


def adam_step(a: float, beta1: float, beta2: float, t: int) -> tuple[float, float]:
    """One optimizer step of the recursion: (A_t, B_t) from A_{t−1} and the betas of step t."""
    a = beta1 * beta1 / beta2 * a + (1 - beta1) ** 2 / (1 - beta2)
    return a, math.sqrt(a) * math.sqrt(1 - beta2**t) / (1 - beta1**t)


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
        order = view.tensor_order
        self.group_of = np.full(len(order), -1)
        index = {name: i for i, name in enumerate(order)}
        for g, group in enumerate(self.groups):
            for name in group.get("tensors", []):
                if name in index:
                    self.group_of[index[name]] = g
        tensors = view.genesis.tensors()
        self.parameter = np.array([tensors.get(n, {}).get("kind", "parameter") == "parameter" for n in order])
        sizes = view.genesis.tensor_sizes()
        self.sqrt_d = np.sqrt(np.array([sizes.get(n, 0) for n in order], dtype=np.float64))
        self.t = np.zeros(len(optimizers), dtype=np.int64)  # steps so far, per optimizer (Adam's step count)
        self.buffer = np.zeros(len(self.groups))  # SGD: bound on the momentum buffer's norm per group
        self.moments = np.zeros(len(self.groups))  # Adam: A_t per group
        self.coef: dict[int, Floats] = {}
        self.decay: dict[int, Floats] = {}
        self.steps: dict[int, int] = {}
        self.sgd_totals: dict[int, dict[int, float]] = {}
        self.groups_at: dict[int, list[dict[str, Any]]] = {}
        self.vacuous = False

    def lrs(self, body: StepBody) -> Floats:
        """The learning rate of each group at this step (logged, else the group's)."""
        if body.lrs is not None:
            return body.lrs
        return np.asarray([float(g.get("lr", math.nan)) for g in self.groups], dtype=np.float64)

    def step(self, s: int, body: StepBody, prev_norms: Floats) -> Floats:
        """L2 bound on each tensor's update at step s (inf for tensors outside every group)."""
        if body.hyper is not None:
            self.groups = [{**g, **h} for g, h in zip(self.groups, body.hyper, strict=False)] + self.groups[
                len(body.hyper):]
        self.groups_at[s] = self.groups
        each = body.optimizer_steps_each if body.optimizer_steps_each is not None else [body.optimizer_steps]
        lrs = self.lrs(body)
        bound = np.full(len(self.group_of), np.inf)
        coef, decay = np.zeros(len(self.groups)), np.zeros(len(self.groups))
        for g, group in enumerate(self.groups):
            mask = self.group_of == g
            lr = float(lrs[g]) if g < len(lrs) else float(group.get("lr", math.nan))
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            owner, kind = self.owner[g], self.group_family[g]
            k, t = (int(each[owner]) if owner < len(each) else 0), int(self.t[owner])
            if kind in ("adam", "adamw"):
                beta1, beta2 = (float(b) for b in group["betas"])
                self.vacuous |= beta1 * beta1 > beta2
                for j in range(1, k + 1):
                    self.moments[g], b = adam_step(float(self.moments[g]), beta1, beta2, t + j)
                    coef[g] += lr * b
                decay[g] = lr * wd * k if kind == "adamw" else 0.0
                bound[mask] = coef[g] * self.sqrt_d[mask] + decay[g] * prev_norms[mask]
            elif kind == "sgd" and body.grad_norms is not None:
                mu = float(group.get("momentum", 0.0) or 0.0)
                theta = float(np.sqrt(np.square(prev_norms[mask]).sum()))
                drive = float(body.grad_norms[g]) + wd * theta
                total = 0.0
                for _ in range(k):
                    self.buffer[g] = mu * self.buffer[g] + drive if mu else drive
                    total += lr * (drive + mu * self.buffer[g] if group.get("nesterov") else self.buffer[g])
                bound[mask] = total
                self.sgd_totals.setdefault(s, {})[g] = total
        for owner, k in enumerate(each[:len(self.t)]):
            self.t[owner] += int(k)
        self.coef[s], self.decay[s], self.steps[s] = coef, decay, sum(int(k) for k in each)
        return bound
