"""The SGD momentum bound: a recurrence in time linear in the steps, equal to its definition as a sum
over the whole gradient history, and an upper bound on what torch's SGD moves.

``Bounds.step`` keeps b_t = μ_t·b_{t−1} + d_t (d_t = ‖g_t‖ + λ‖θ_{t−1}‖) instead of summing
Σ_i (Π_{i<k≤t} μ_k)·d_i afresh at every step; these tests hold the two equal on random histories
(momentum, Nesterov, weight decay, learning rates and several optimizer steps per recorded step,
each changing between steps) and the bound above torch's real updates, dampening included.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ledger.verify._bounds import Bounds
from ledger.verify._columns import StepColumns

TENSORS = {"a": (3, 4), "b": (5,), "c": (7,)}
GROUPS = [["a", "b"], ["c"]]


def _view(groups: list[dict]) -> SimpleNamespace:
    sizes = {name: math.prod(shape) for name, shape in TENSORS.items()}
    optimizer = SimpleNamespace(class_name="torch.optim.sgd.SGD", mro=("torch.optim.sgd.SGD",),
                                param_groups=[{**g, "tensors": names} for g, names in zip(groups, GROUPS,
                                                                                         strict=True)])
    genesis = SimpleNamespace(all_optimizers=[optimizer], tensor_sizes=lambda: sizes,
                              tensors=lambda: {n: {"name": n, "shape": list(s), "dtype": "F32", "kind": "parameter"}
                                               for n, s in TENSORS.items()})
    return SimpleNamespace(genesis=genesis, tensor_order=list(TENSORS))


def _step(bounds: Bounds, s: int, body: SimpleNamespace, prev: np.ndarray) -> np.ndarray:
    """The bound at one recorded step (a one-row ``Bounds.run``)."""
    columns = StepColumns(np.array([s]), prev[None, :], np.array([body.optimizer_steps]), body.lrs[None, :],
                          np.array([True]), body.grad_norms[None, :], np.array([True]),
                          hyper={0: body.hyper} if body.hyper is not None else {})
    return bounds.run(columns, prev[None, :])[0]


def _explicit(history: list[tuple[float, float, float, bool]]) -> float:
    """The bound on the last optimizer step by its definition: the momentum buffer's bound summed
    over the whole history (drive, momentum, lr, nesterov per optimizer step)."""
    t = len(history) - 1
    buffer = sum(d * math.prod(history[k][1] for k in range(i + 1, t + 1)) for i, (d, _, _, _) in enumerate(history))
    drive, mu, lr, nesterov = history[t]
    if not mu:
        buffer = drive
    return lr * (drive + mu * buffer if nesterov else buffer)


@pytest.mark.parametrize("seed", range(20))
def test_recurrence_equals_the_sum_over_the_whole_history(seed):
    rng = np.random.default_rng(seed)
    groups = [{"lr": 0.1, "momentum": float(rng.choice([0.0, 0.5, 0.9, 0.99])), "weight_decay": float(rng.random()),
               "nesterov": bool(rng.integers(2)), "dampening": 0.0} for _ in GROUPS]
    bounds = Bounds(_view(groups))
    histories: list[list[tuple[float, float, float, bool]]] = [[] for _ in GROUPS]
    current = [dict(g) for g in groups]
    for s in range(60):
        hyper = None
        if rng.random() < 0.2:  # a scheduler moves momentum, Nesterov, weight decay
            hyper = [{"momentum": float(rng.choice([0.0, 0.3, 0.9])), "nesterov": bool(rng.integers(2)),
                      "weight_decay": float(rng.random() * 0.1)} for _ in GROUPS]
            current = [{**c, **h} for c, h in zip(current, hyper, strict=True)]
        lrs = rng.random(len(GROUPS)) * 0.1
        grads = rng.random(len(GROUPS)) * 3
        prev = rng.random(len(TENSORS)) * 10
        k = int(rng.choice([0, 1, 1, 1, 3]))
        body = SimpleNamespace(hyper=hyper, optimizer_steps_each=None, optimizer_steps=k, lrs=lrs, grad_norms=grads)
        bound = _step(bounds, s, body, prev)
        for g, names in enumerate(GROUPS):
            idx = [list(TENSORS).index(n) for n in names]
            theta = float(np.sqrt(np.square(prev[idx]).sum()))
            c = current[g]
            drive = float(grads[g]) + c["weight_decay"] * theta
            expected = 0.0
            for _ in range(k):
                histories[g].append((drive, c["momentum"], float(lrs[g]), c["nesterov"]))
                expected += _explicit(histories[g])
            assert bound[idx] == pytest.approx(expected, rel=1e-12, abs=1e-300)
            assert bounds.sgd_totals[0, g] == pytest.approx(expected, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("nesterov, dampening", [(False, 0.0), (False, 0.3), (False, 0.9), (True, 0.0)])
def test_bound_holds_for_torch_sgd(nesterov, dampening):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64)) for n, shape in TENSORS.items()}
    groups = [{"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "nesterov": nesterov, "dampening": dampening},
              {"lr": 0.02, "momentum": 0.5, "weight_decay": 0.0, "nesterov": nesterov, "dampening": dampening}]
    optimizer = torch.optim.SGD([{**g, "params": [params[n] for n in names]} for g, names in zip(groups, GROUPS,
                                                                                               strict=True)])
    bounds = Bounds(_view(groups))
    rng = np.random.default_rng(1)
    for s in range(200):
        lrs = np.array([0.05, 0.02]) * (1 + np.sin(s / 10))  # a schedule up and down
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = float(lr)
        before = {n: p.detach().clone() for n, p in params.items()}
        prev = np.array([float(before[n].norm()) for n in TENSORS])
        scale, aligned = float(rng.choice([0.01, 1.0, 10.0])), rng.random() < 0.5  # aligned: the bound is tight
        for p in params.values():
            p.grad = (torch.ones_like(p) if aligned else torch.randn_like(p)) * scale
        grads = np.array([math.sqrt(sum(float(params[n].grad.norm()) ** 2 for n in names)) for names in GROUPS])
        optimizer.step()
        body = SimpleNamespace(hyper=None, optimizer_steps_each=None, optimizer_steps=1, lrs=lrs, grad_norms=grads)
        bound = _step(bounds, s, body, prev)
        for g, names in enumerate(GROUPS):
            moved = math.sqrt(sum(float((params[n].detach() - before[n]).norm()) ** 2 for n in names))
            assert moved <= bound[list(TENSORS).index(names[0])] * (1 + 1e-9), (s, g, moved)
