"""Step bodies read into columns (``ledger.verify._columns``) equal ``StepBody.from_body(decode_body(…))``
body by body — every field, every refusal and its message — and the bounds computed over all steps at
once equal those computed one step at a time."""

from __future__ import annotations

import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from ledger._encoding import decode_body, encode_body
from ledger._schema import StepBody
from ledger.errors import FormatError
from ledger.verify._bounds import Bounds
from ledger.verify._columns import MIN_GROUP, StepColumns, read_steps
from ledger.verify._template import template

TENSORS = {"a": (3, 4), "b": (5,), "c": (7,)}
GROUPS = [["a", "b"], ["c"]]
K = 8


def _genesis(kind: str = "torch.optim.adamw.AdamW", **hyper: object) -> SimpleNamespace:
    optimizer = SimpleNamespace(class_name=kind, mro=(kind,),
                                param_groups=[{"lr": 0.01, "weight_decay": 0.01, **hyper, "tensors": names}
                                              for names in GROUPS])
    sizes = {name: math.prod(shape) for name, shape in TENSORS.items()}
    return SimpleNamespace(all_optimizers=[optimizer], optimizer=optimizer, recorded=True, tensor_order=list(TENSORS),
                           fingerprints=SimpleNamespace(sketch_k=K), tensor_sizes=lambda: sizes,
                           tensors=lambda: {n: {"dtype": "F32", "kind": "parameter"} for n in TENSORS})


def _bodies(n: int, seed: int) -> list[bytes]:
    """Step bodies as a recorder writes them, with fields that come and go and floats of every width."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        loss = float(rng.choice([0.5, np.float32(rng.random()), rng.random(), math.inf, math.nan]))
        body = StepBody(norms=rng.random(len(TENSORS)) * 10, metrics={"loss": loss, "lr": 0.01},
                        optimizer_steps=int(rng.choice([0, 1, 1, 1, 3])),
                        lrs=rng.random(2) * 0.01 if rng.random() < 0.9 else None,
                        grad_norms=rng.random(2) if rng.random() < 0.9 else None,
                        sketch=rng.normal(size=K) if s % 7 == 0 else None,
                        batch_digest=rng.bytes(32) if s % 2 else None,
                        hyper=[{"betas": [0.9, 0.999]}, {"betas": [0.8, 0.99]}] if s % 31 == 5 else None)
        out.append(encode_body(body.to_body()))
    return out


def _one(data: bytes, genesis: SimpleNamespace) -> StepBody | str:
    try:
        return StepBody.from_body(decode_body(data), genesis)
    except FormatError as exc:
        return str(exc)


def _equal(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is not None and b is not None and np.array_equal(a, b, equal_nan=True)  # type: ignore[arg-type]
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("seed", range(5))
def test_columns_equal_each_body_read_alone(seed):
    genesis = _genesis()
    bodies = _bodies(1500, seed)
    read = read_steps(bodies, genesis)
    assert not read.failed
    cols = read.columns
    assert len(read.decoded) < len(bodies) // 2  # most went through templates
    for i, data in enumerate(bodies):
        body = _one(data, genesis)
        assert isinstance(body, StepBody)
        assert np.array_equal(cols.norms[i], body.norms)
        assert cols.optimizer_steps[i] == body.optimizer_steps
        assert cols.has_lrs[i] == (body.lrs is not None) and cols.has_grad_norms[i] == (body.grad_norms is not None)
        if body.lrs is not None:
            assert np.array_equal(cols.lrs[i], body.lrs)
        if body.grad_norms is not None:
            assert np.array_equal(cols.grad_norms[i], body.grad_norms)
        assert _equal(cols.sketches.get(i), body.sketch) or (i not in cols.sketches and body.sketch is None)
        assert cols.hyper.get(i) == body.hyper and cols.each.get(i) == body.optimizer_steps_each
        if i in read.decoded:
            decoded = read.decoded[i]
            assert all(_equal(getattr(decoded, f), getattr(body, f)) for f in StepBody.__slots__)


def _refusals() -> list[tuple[str, bytes]]:
    """A template-shaped body with one float or byte changed, each a way to break the encoding."""
    base = encode_body(StepBody(norms=np.ones(3), metrics={"loss": 0.1}, optimizer_steps=1, lrs=np.ones(2),
                                grad_norms=np.ones(2)).to_body())
    pos = base.index(b"\xfb") + 1  # the loss, a double
    cases = {"a double that fits a float32": struct.pack(">d", 0.5), "a NaN as a double": struct.pack(">d", math.nan),
             "an infinity as a double": struct.pack(">d", math.inf), "a double of its own": struct.pack(">d", 0.3)}
    out = [(why, base[:pos] + raw + base[pos + 8:]) for why, raw in cases.items()]
    key = base.index(b"norms")
    out.append(("a key out of order", base[:key] + b"zorms" + base[key + 5:]))
    out.append(("a typed array's tag changed", base.replace(b"\xd8\x56", b"\xd8\x55", 1)))
    out.append(("norms of the wrong length", encode_body(StepBody(norms=np.ones(4), metrics={"loss": 0.1},
                                                                   lrs=np.ones(2)).to_body())))
    return out


def test_refusals_are_those_of_each_body_read_alone():
    genesis = _genesis()
    good = encode_body(StepBody(norms=np.ones(3), metrics={"loss": 0.1}, optimizer_steps=1, lrs=np.ones(2),
                                grad_norms=np.ones(2)).to_body())
    cases = _refusals()
    bodies = [good] * MIN_GROUP + [data for _, data in cases] + [good] * MIN_GROUP
    read = read_steps(bodies, genesis)
    for i, (why, data) in enumerate(cases, start=MIN_GROUP):
        alone = _one(data, genesis)
        if why == "a double of its own":
            assert isinstance(alone, StepBody) and i not in read.failed
            assert read.columns.norms[i].tolist() == [1.0, 1.0, 1.0]
        else:
            assert isinstance(alone, str), why
            assert read.failed[i][1] == alone, why


def test_template_refuses_shapes_it_does_not_read():
    genesis = _genesis()
    hyper = encode_body(StepBody(norms=np.ones(3), metrics={}, hyper=[{"lr": 0.1}]).to_body())
    listed = encode_body({**StepBody(norms=np.ones(3), metrics={}).to_body(), "norms": [1.0, 2.0, 3.5]})
    other = encode_body({**StepBody(norms=np.ones(3), metrics={}).to_body(), "extra": 0.5})
    plain = encode_body(StepBody(norms=np.ones(3), metrics={"loss": 0.1}).to_body())
    assert all(template(data, _one(data, genesis)) is None for data in (hyper, listed, other))  # type: ignore[arg-type]
    assert template(plain, _one(plain, genesis)) is not None  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.sgd.SGD"])
@pytest.mark.parametrize("seed", range(3))
def test_bounds_over_all_steps_equal_step_by_step(kind, seed):
    rng = np.random.default_rng(seed)
    hyper = {"betas": [0.9, 0.999]} if "Adam" in kind else {"momentum": 0.9, "nesterov": True}
    genesis = _genesis(kind, **hyper)
    view = SimpleNamespace(genesis=genesis, tensor_order=list(TENSORS))
    n = 200
    cols = StepColumns.empty(n, len(TENSORS), len(GROUPS))
    cols.steps[:] = np.arange(n)
    cols.norms[:] = rng.random((n, len(TENSORS))) * 10
    cols.optimizer_steps[:] = rng.choice([0, 1, 1, 1, 3], n)  # skipped steps, several per entry
    cols.has_lrs[:] = rng.random(n) < 0.8
    cols.lrs[cols.has_lrs] = rng.random((int(cols.has_lrs.sum()), 2)) * 0.01
    cols.has_grad_norms[:] = rng.random(n) < 0.9
    cols.grad_norms[cols.has_grad_norms] = rng.random((int(cols.has_grad_norms.sum()), 2))
    for row in rng.choice(n, 8, replace=False).tolist():  # a scheduler moving the other hyperparameters
        cols.hyper[row] = [{"betas": [float(rng.choice([0.8, 0.9])), 0.999]} if "Adam" in kind else
                           {"momentum": float(rng.choice([0.0, 0.5, 0.9])), "nesterov": bool(rng.integers(2))}
                           for _ in GROUPS]
    prev = np.vstack([np.ones((1, len(TENSORS))), cols.norms[:-1]])
    whole, single = Bounds(view), Bounds(view)
    bound = whole.run(cols, prev)
    for row in range(n):
        one = cols.take(np.array([row]))
        assert np.array_equal(single.run(one, prev[row:row + 1])[0], bound[row])
        for name in ("coef", "decay", "sgd_totals", "lrs", "steps"):
            assert np.array_equal(getattr(single, name)[0], getattr(whole, name)[row]), name
        assert single.groups_at[row] == whole.groups_at[row]


@pytest.mark.parametrize("seed", range(5))
def test_metric_series_is_each_steps_last_row(seed):
    pa = pytest.importorskip("pyarrow")
    from ledger.verify._series import step_metrics

    rng = np.random.default_rng(seed)
    kinds, steps, maps = [], [], []
    for _ in range(300):  # resumed runs re-record steps; rows without the key, with NaN, null, twice
        kinds.append(str(rng.choice(["step", "step", "step", "eval", "checkpoint"])))
        steps.append(int(rng.integers(0, 60)))
        pairs = [(str(rng.choice(["loss", "lr", "acc"])), float(rng.choice([rng.random(), math.nan])))
                 for _ in range(int(rng.integers(0, 4)))]
        maps.append(None if rng.random() < 0.05 else pairs)
    table = pa.table({"kind": pa.array(kinds), "step": pa.array(steps, pa.int64()),
                      "metrics": pa.array(maps, pa.map_(pa.string(), pa.float64()))})
    table = pa.concat_tables([table.slice(0, 100), table.slice(100)])  # two chunks
    last = {s: dict(m or []) for k, s, m in zip(kinds, steps, maps, strict=True) if k == "step"}
    series = step_metrics(table, ("loss", "lr"))
    for key, got in zip(("loss", "lr"), series, strict=True):
        xs = [s for s in sorted(last) if key in last[s] and not math.isnan(last[s][key])]
        assert got == (xs, [last[s][key] for s in xs])
