"""The full chain check reads the step bodies a template accepted through the template: their metrics,
compared with the metrics column at once, give exactly the verdict and report of decoding every body
and comparing one by one (``view=None`` takes that path), whatever the column holds; the seal and the
tree heads read their Merkle roots from one tree shared through the context."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ledger._encoding import decode_body
from ledger._merkle import PrefixTree
from ledger._record import HEADER_SIZE, merkle_root
from ledger.verify import load_context
from ledger.verify._columns import read_steps
from ledger.verify._integrity import check_chain
from ledger.verify._template import template

METRICS = pa.map_(pa.string(), pa.float64())


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from recipes import TinyRecipe

    from ledger import Signer
    from ledger.hooks import FingerprintOptions, train

    path = tmp_path_factory.mktemp("chain") / "L"
    # a fixed cadence (the budget's depends on the machine's timing): most step bodies share one shape
    train(TinyRecipe(), steps=48, path=path, key=Signer.from_seed(bytes(range(32))), seed=3, checkpoint_every=24,
          fingerprints=FingerprintOptions(sketch=4, digests=6, batch="every"))
    return path


def _with_metrics(ctx, rows: list) -> object:
    """The context with its metrics column replaced (in sliced chunks, one of them empty)."""
    whole = pa.array(rows, METRICS)
    n = len(rows)
    column = pa.chunked_array([whole.slice(0, 3), whole.slice(3, 0), whole.slice(3, n // 2 - 3), whole.slice(n // 2)])
    table = ctx.loaded.table.set_column(ctx.loaded.table.schema.get_field_index("metrics"), "metrics", column)
    return dataclasses.replace(ctx, loaded=dataclasses.replace(ctx.loaded, table=table))


def _step_rows(ctx) -> list[int]:
    return sorted(int(p) for block in ctx.view.accepted for p in block.positions)


def _tampered(rows: list, at: list[int]) -> dict[str, list]:
    """Ways to change the metrics of the rows ``at`` (each names what it does)."""
    def each(change):
        out = list(rows)
        for i in at:
            out[i] = change(list(rows[i]))
        return out

    return {
        "untouched": list(rows),
        "reordered": each(lambda m: m[::-1]),
        "value": each(lambda m: [(k, v + 1e-9) for k, v in m]),
        "nan": each(lambda m: [(m[0][0], math.nan), *m[1:]]),
        "negated": each(lambda m: [(m[0][0], -m[0][1]), *m[1:]]),
        "renamed": each(lambda m: [("other", m[0][1]), *m[1:]]),
        "extra": each(lambda m: [*m, ("extra", 1.0)]),
        "missing": each(lambda m: m[1:]),
        "repeated": each(lambda m: [m[0], m[0]] + m[2:] if len(m) > 1 else [m[0], m[0]]),
        "empty": each(lambda m: []),
        "null value": each(lambda m: [(m[0][0], None), *m[1:]]),
        "null map": [None if i in at else r for i, r in enumerate(rows)],
    }


@pytest.mark.parametrize("where", ["one", "many"])
def test_template_path_reports_what_decoding_every_body_reports(recorded: Path, where: str):
    ctx = load_context(recorded)
    assert ctx.view is not None and ctx.view.accepted  # the step bodies went through templates
    steps = _step_rows(ctx)
    assert len(steps) >= 16
    rows = ctx.loaded.table["metrics"].to_pylist()
    at = [steps[len(steps) // 2]] if where == "one" else steps[::2]
    for name, metrics in _tampered(rows, at).items():
        tampered = _with_metrics(ctx, metrics)
        fast, slow = check_chain(tampered), check_chain(dataclasses.replace(tampered, view=None))
        assert fast == slow, name
        assert (fast.status == "pass") == (name in ("untouched", "reordered")), name


def test_a_body_templates_did_not_accept_is_still_decoded(recorded: Path):
    ctx = load_context(recorded)
    first = _step_rows(ctx)[0]
    kept = [dataclasses.replace(b, positions=b.positions[b.positions != first],
                                values=b.values[b.positions != first]) for b in ctx.view.accepted]
    rows = ctx.loaded.table["metrics"].to_pylist()
    rows[first] = [("other", 1.0)]
    tampered = _with_metrics(dataclasses.replace(ctx, view=dataclasses.replace(ctx.view, accepted=tuple(kept))), rows)
    result = check_chain(tampered)
    assert result.status == "fail" and result.data["first_bad_seq"] == first
    assert "metrics column differs from the record body" in result.detail


def test_accepted_metrics_are_each_bodys_own(recorded: Path):
    """The names and float64 values a template reads are those ``decode_body`` gives, body by body."""
    ctx = load_context(recorded)
    records = ctx.loaded.records.materialize()
    for block in ctx.view.accepted:
        for position, values in zip(block.positions.tolist(), block.values, strict=True):
            metrics = decode_body(records[position][HEADER_SIZE:])["metrics"]
            assert tuple(metrics) == block.names
            assert np.array_equal(values, list(metrics.values()), equal_nan=True)


def test_templates_read_floats_of_every_width_under_metrics():
    from test_step_columns import _bodies, _genesis

    bodies = _bodies(400, 7)
    read = read_steps(bodies, _genesis())
    assert read.accepted
    for block in read.accepted:
        for i, values in zip(block.positions.tolist(), block.values, strict=True):
            metrics = decode_body(bodies[i])["metrics"]
            assert tuple(metrics) == block.names
            assert all(np.signbit(a) == np.signbit(b) and (a == b or (math.isnan(a) and math.isnan(b)))
                       for a, b in zip(values, metrics.values(), strict=True))


def test_a_metric_that_is_not_a_float_leaves_the_template_without_metrics():
    from ledger._encoding import encode_body
    from ledger._schema import StepBody

    data = encode_body({**StepBody(norms=np.ones(3), metrics={"loss": 1.5}).to_body(), "metrics": {"loss": 2}})
    shape = template(data, StepBody.from_body(decode_body(data)))
    assert shape is not None and shape.metrics is None


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 100, 1025])
def test_prefix_tree_roots_are_the_merkle_roots_of_every_prefix(n: int):
    leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]
    tree = PrefixTree(leaves)
    sizes = range(n + 1) if n < 200 else [0, 1, 511, 512, 513, 1000, 1024, n]
    assert all(tree.root(s) == merkle_root(leaves[:s]) for s in sizes)


def test_seal_and_heads_share_one_tree(recorded: Path, monkeypatch: pytest.MonkeyPatch):
    import ledger.verify._context as context_module
    from ledger.verify import verify_ledger

    built = []

    class Counting(PrefixTree):
        def __init__(self, leaves):
            built.append(len(leaves))
            super().__init__(leaves)

    monkeypatch.setattr(context_module, "PrefixTree", Counting)
    status = {r.name: r.status for r in verify_ledger(recorded).checks}
    assert status["seal"] == "pass" and status["heads"] in ("pass", "warn")  # warn: no --key
    assert len(built) == 1


def test_column_wise_comparison_agrees_with_same_metrics_row_by_row():
    """Random blocks (no metrics, one, three) against random column rows: every row decided is decided
    as ``_same_metrics`` decides it, a row left undecided does not hold the body's names once each, and
    a column with a null map or value anywhere is left to the one-by-one comparison."""
    from types import SimpleNamespace

    from ledger.verify._integrity import _accepted_metrics, _same_metrics
    from ledger.verify._template import Accepted

    rng = np.random.default_rng(5)
    pool = [0.0, -0.0, 1.5, -1.5, math.nan, math.inf, 2.0 ** -30]
    shapes = [(), ("loss",), ("lr", "loss", "grad_norm")]
    n = 600
    owner = rng.integers(0, len(shapes), n)
    bodies = [dict(zip(shapes[o], rng.choice(pool, len(shapes[o])).tolist(), strict=True)) for o in owner]
    rows: list = []
    for body in bodies:
        entries = list(body.items())
        pick = rng.integers(0, 8)
        if pick == 1 and entries:
            entries[0] = (entries[0][0], float(rng.choice(pool)))
        elif pick == 2:
            entries = entries[::-1]
        elif pick == 3:
            entries.append(("loss", 1.5))
        elif pick == 4 and entries:
            entries = entries[1:]
        elif pick == 5 and entries:
            entries[-1] = ("other", entries[-1][1])
        rows.append(entries)
    blocks = []
    for o, names in enumerate(shapes):
        mine = np.flatnonzero(owner == o)
        values = np.array([list(bodies[i].values()) for i in mine], dtype=np.float64).reshape(len(mine), len(names))
        blocks.append(Accepted(mine, names, values))

    def compare(column_rows: list) -> tuple[np.ndarray, np.ndarray]:
        whole = pa.array(column_rows, METRICS)
        table = pa.table({"metrics": pa.chunked_array([whole.slice(0, 7), whole.slice(7, 0), whole.slice(7)])})
        ctx = SimpleNamespace(view=SimpleNamespace(accepted=tuple(blocks)), loaded=SimpleNamespace(table=table))
        return _accepted_metrics(ctx, n)  # type: ignore[arg-type]

    decided, same = compare(rows)
    assert decided.sum() > n // 2
    for i in range(n):
        if decided[i]:
            assert same[i] == _same_metrics(rows[i], bodies[i]), (i, rows[i], bodies[i])
        else:
            assert len(rows[i]) != len(bodies[i]) or sorted(k for k, _ in rows[i]) != sorted(bodies[i])
    assert not compare([None, *rows[1:]])[0].any()
    assert not compare([[("loss", None)], *rows[1:]])[0].any()
