"""The shortcuts that make ``verify --sample 0`` fast compute exactly what they replace: the Adam
bound's sums equal the step-by-step loop bit for bit, the header matrix is read once per table, and
a fresh ``ledger verify --sample 0`` imports no module that only other checks or commands need."""

from __future__ import annotations

import dataclasses
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ledger._reader import Ledger
from ledger.verify._bounds import _adam_coef
from ledger.verify._load import header_matrix, load


def _adam_loop(a: float, t: int, k: np.ndarray, lr: np.ndarray, beta1: float, beta2: float) -> tuple[np.ndarray, float]:
    """Σ α·B per row, one optimizer step after another (the definition)."""
    decay_a, drive_a = beta1 * beta1 / beta2, (1 - beta1) ** 2 / (1 - beta2)
    coef, first = np.zeros(len(k)), t + np.cumsum(k) - k
    for row, (rate, steps, t0) in enumerate(zip(lr.tolist(), k.tolist(), first.tolist(), strict=True)):
        c = 0.0
        for j in range(t0 + 1, t0 + steps + 1):
            a = decay_a * a + drive_a
            c += rate * (math.sqrt(a) * math.sqrt(1 - beta2**j) / (1 - beta1**j))
        coef[row] = c
    return coef, a


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, NaN payloads aside (NaN where NaN, every other value and sign the same)."""
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all() and (a[~nan].view(np.int64) == b[~nan].view(np.int64)).all())


@pytest.mark.parametrize("seed", range(6))
def test_adam_sums_equal_the_loop_bit_for_bit(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        n = rng.choice([0, 1, 7, 300, 5000])
        beta1 = rng.choice([0.9, 0.0, 0.5, -0.3, 0.999999, rng.random()])
        beta2 = rng.choice([0.999, 0.5, 0.81, 0.01, 0.9999999, rng.random() or 0.5])
        k = np.array([rng.choice([0, 1, 1, 1, 2, 5]) for _ in range(n)], np.int64)
        lr = np.array([rng.choice([1e-3, 0.0, -0.0, math.nan, math.inf, -1e-5, rng.random()]) for _ in range(n)])
        t, a = rng.choice([0, 7, 40_000, 10**9]), rng.choice([0.0, 1.0, 123.4, 1e300])
        expected, expected_a = _adam_loop(a, t, k, lr, beta1, beta2)
        coef = np.full(n, 42.0)
        got_a = _adam_coef(a, t, k, lr, (beta1, beta2, beta1 * beta1 / beta2, (1 - beta1) ** 2 / (1 - beta2)), coef)
        assert _same_floats(coef, expected), (beta1, beta2, t, a)
        assert got_a == expected_a or (math.isnan(got_a) and math.isnan(expected_a))


def test_header_matrix_read_once_per_table(make_ledger) -> None:
    loaded = load(Ledger(make_ledger(steps=30)))
    matrix, lengths = loaded.headers()
    expected = header_matrix(loaded.table["record"])
    assert (matrix == expected[0]).all() and (lengths == expected[1]).all()
    assert loaded.headers()[0] is matrix and not matrix.flags.writeable  # shared: nobody may change it
    shorter = dataclasses.replace(loaded, table=loaded.table.slice(0, 10))
    assert len(shorter.headers()[0]) == 10  # another table: read again
    loaded.table = loaded.table.slice(0, 5)
    assert len(loaded.headers()[1]) == 5
    assert loaded.joined_hashes() == b"".join(loaded.hashes) and loaded.joined_hashes() is loaded.joined_hashes()
    loaded.hashes = loaded.hashes[:3]
    assert loaded.joined_hashes() == b"".join(loaded.hashes)  # another list: joined again


# modules the --sample 0 verify of a recorded, sealed ledger (key and model given) has no use for
UNNEEDED = ("pandas", "pyarrow.compute", "numpy.ma", "torch", "scipy", "matplotlib", "mlflow", "ledger.hooks",
            "ledger._writer", "ledger._tsa", "ledger.verify._mlflow", "ledger.verify._replay", "ledger._cli_proofs",
            "ledger._proofs")


def test_sample0_verify_imports_only_what_it_uses(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from recipes import TinyRecipe

    from ledger import generate_keypair, load_signer
    from ledger.hooks import train

    private, public = generate_keypair(tmp_path / "trainer")
    path = tmp_path / "L"
    train(TinyRecipe(), steps=24, path=path, key=load_signer(private), seed=3, checkpoint_every=12)
    argv = ["verify", str(path), "--key", str(public), "--sample", "0", "--json"]
    code = (f"import sys\nfrom ledger._cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as exc:\n"
            f"    print('exit', exc.code, file=sys.stderr)\n"
            f"print(sorted(m for m in {UNNEEDED!r} if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-2:] == ["exit 0", "[]"], done.stderr


@pytest.mark.parametrize("seed", range(4))
def test_bodies_read_from_buffers_equal_the_records_sliced(seed: int) -> None:
    import pyarrow as pa

    from ledger.verify._load import Bodies

    rng = random.Random(seed)
    lengths = [rng.choice([0, 3, 40, 40, 40, 41, 100]) for _ in range(600)]
    if seed % 2:  # runs of one length back to back, as a recorder writes them
        lengths = sorted(lengths)
    records = [bytes(rng.getrandbits(8) for _ in range(n)) for n in lengths]
    whole = pa.array(records, pa.binary())
    column = pa.chunked_array([whole.slice(0, 7), whole.slice(7, 0), whole.slice(7, 300), whole.slice(307)])
    rows = np.array(sorted(rng.sample(range(len(records)), 400)) if seed < 2 else range(len(records)), np.int64)
    skip = rng.choice([0, 5, 12])
    bodies = Bodies.of_records(column, rows, skip)
    expected = [records[r][skip:] for r in rows.tolist()]
    assert [bodies[i] for i in range(len(bodies))] == expected
    assert bodies.lengths().tolist() == [len(b) for b in expected]
    for size in set(bodies.lengths().tolist()):
        idx = np.flatnonzero(bodies.lengths() == size)
        assert bodies.matrix(idx).tobytes() == b"".join(expected[i] for i in idx.tolist())
        assert Bodies.of(expected).matrix(idx).tobytes() == b"".join(expected[i] for i in idx.tolist())
    order = np.array(rng.sample(range(len(rows)), 50), dtype=np.int64)
    taken = bodies.take(order)
    assert [taken[i] for i in range(len(taken))] == [expected[i] for i in order.tolist()]


def test_steps_in_order_equal_steps_counted(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from recipes import TinyRecipe

    from ledger import Signer
    from ledger._record import HEADER_SIZE, Kind
    from ledger.hooks import train
    from ledger.verify._columns import Steps, read_steps
    from ledger.verify._load import Bodies, header_field
    from ledger.verify._run import build

    path = tmp_path / "L"
    train(TinyRecipe(), steps=40, path=path, key=Signer.from_seed(bytes(range(32))), seed=3, checkpoint_every=16)
    loaded = load(Ledger(path))
    genesis = build(loaded, path, None).genesis
    rows = np.flatnonzero(header_field(loaded.headers()[0], "kind") == Kind.STEP)
    steps = header_field(loaded.headers()[0], "step")[rows]
    bodies = [loaded.records[i][HEADER_SIZE:] for i in rows.tolist()]
    fast = Steps.in_order(read_steps(bodies, genesis), steps, Bodies.of(bodies), genesis)
    slow = Steps.counted(read_steps(bodies, genesis), dict(zip(steps.tolist(), range(len(steps)), strict=True)),
                         Bodies.of(bodies), genesis)
    for name in ("steps", "norms", "optimizer_steps", "lrs", "has_lrs", "grad_norms", "has_grad_norms"):
        assert np.array_equal(getattr(fast.columns, name), getattr(slow.columns, name), equal_nan=True), name
    for name in ("sketches", "hyper", "each"):
        a, b = getattr(fast.columns, name), getattr(slow.columns, name)
        assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a), name
    assert list(fast) == list(slow) and all(repr(fast[s]) == repr(slow[s]) for s in steps.tolist())


def test_step_lookup_by_bisection_answers_as_the_mapping() -> None:
    from ledger.verify._columns import StepColumns, Steps
    from ledger.verify._load import Bodies

    columns = StepColumns.empty(5, 1, 1)
    columns.steps[:] = [-(1 << 63), -3, 0, 7, (1 << 63) - 1]
    steps = Steps(columns, Bodies.of([b""] * 5), None)
    mapping = {s: r for r, s in enumerate(columns.steps.tolist())}
    for key in [-(1 << 63), -(1 << 63) - 1, -3, -2, 0, 1, 7, 8, (1 << 63) - 1, 1 << 63, 1 << 70, True, False, 7.0,
                np.int64(7), np.uint64(7), "7", None]:
        assert (key in steps) == (key in mapping), key
        if key in mapping:
            assert steps.row(key) == mapping[key]
        else:
            with pytest.raises(KeyError):
                steps.row(key)


@pytest.mark.parametrize("length", [1, 7, 8, 9, 64, 215, 300, 5000])
def test_template_compares_fixed_bytes_as_a_bytewise_comparison(length: int) -> None:
    """Also across the blocks of rows matches() compares at a time (a quarter MiB: 52 rows of
    5000 bytes, 120 rows are three blocks)."""
    from ledger.verify._template import Template

    rng = np.random.default_rng(length)
    for _ in range(20):
        rows = rng.integers(0, 256, (120, length), dtype=np.uint8)
        fixed = np.sort(rng.choice(length, int(rng.integers(0, length + 1)), replace=False))
        expect = rows[0, fixed].copy()
        rows[:60, fixed] = expect
        for i in range(60, 90):  # one bit off in one fixed byte
            rows[i] = rows[0]
            if len(fixed):
                rows[i, fixed[rng.integers(len(fixed))]] ^= 1 << int(rng.integers(8))
        shape = Template(length, fixed, expect, (), {})
        assert (shape.matches(rows) == np.all(rows[:, fixed] == expect, axis=1)).all()
