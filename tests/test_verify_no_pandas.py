"""``ledger verify`` never imports pandas (issue #14: pandas is ~0.2 s of CPU, more than verify's own
imports): the verifier reads Arrow columns from their buffers (``ledger._arrow``), and those
readers give what pyarrow's own conversions give on chunked, sliced and null-holding columns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ledger._arrow import fixed_rows, int64_values, map_entries, pylist_at, string_codes, typed_array
from ledger.errors import FormatError


def chunked(values: list, type_: pa.DataType) -> pa.ChunkedArray:
    """``values`` as a chunked array of sliced chunks (offsets into shared buffers), one empty."""
    whole = pa.array(values, type_)
    n = len(values)
    return pa.chunked_array([whole.slice(0, 2), whole.slice(2, 0), whole.slice(2, n // 2 - 2),
                             whole.slice(n // 2)], type_)


def test_int64_values_are_the_column_and_a_null_is_a_format_error():
    column = chunked(list(range(-5, 20)), pa.int64())
    assert int64_values(column).tolist() == column.to_pylist()
    with pytest.raises(FormatError, match="null"):
        int64_values(chunked([1, None, 3, 4, 5, 6], pa.int64()))
    with pytest.raises(TypeError):
        int64_values(chunked(["a"] * 6, pa.string()))


def test_string_codes_name_each_value_among_the_labels():
    values = ["step", "seal", None, "", "stepx", "genesis", "step", "é", None, "seal"]
    labels = ["genesis", "step", "seal", "é"]
    expected = [labels.index(v) if v in labels else -1 for v in values]
    assert string_codes(chunked(values, pa.string()), labels).tolist() == expected
    assert string_codes(pa.array(values, pa.string()), labels).tolist() == expected
    assert string_codes(chunked(values, pa.string()), []).tolist() == [-1] * len(values)


def test_string_codes_equal_pyarrow_compute_index_in_on_random_columns():
    """Read from the offsets and bytes as pyarrow.compute's index_in reads them: random labels and
    values (same lengths, prefixes, empty, non-ASCII, nulls), chunked and sliced, every row one
    label (the back-to-back case), a repeated label (its first index)."""
    import pyarrow.compute as pc

    rng = np.random.default_rng(5)
    alphabet = ["a", "b", "é", "step", "seal", ""]
    for trial in range(300):
        words = ("".join(rng.choice(alphabet, rng.integers(0, 3))) for _ in range(rng.integers(0, 6)))
        labels = list(dict.fromkeys(words))
        pool = labels + ["".join(rng.choice(alphabet, rng.integers(0, 4))) for _ in range(3)] + [None]
        values = [pool[i] for i in rng.integers(0, len(pool), rng.integers(4, 40))]
        if trial % 7 == 0 and labels:
            values = [labels[-1]] * len(values)  # every row the same label
        for column in (chunked(values, pa.string()), pa.array(values, pa.string()).slice(1)):
            found = pc.index_in(column, value_set=pa.array(labels, pa.string()))
            expected = [-1 if v is None else v for v in found.to_pylist()]
            assert string_codes(column, labels).tolist() == expected, (labels, values)
    assert string_codes(pa.array(["x", "y", "x"]), ["x", "y", "x"]).tolist() == [0, 1, 0]


def test_fixed_rows_and_pylist_at_read_the_rows_asked_for():
    values = [bytes([i]) * 4 for i in range(12)]
    column = chunked(values, pa.binary(4))
    assert [bytes(r) for r in fixed_rows(column)] == values
    for rows in ([], [3], [2, 3, 4, 5], [0, 5, 11], [7, 1], [4, 4]):
        assert pylist_at(column, rows) == [values[i] for i in rows]


def test_map_entries_are_the_metrics_entries_with_those_keys():
    maps = [[("loss", 1.0), ("lr", 0.1)], None, [], [("acc", 2.0), ("loss", None)], [("loss", 3.0), ("loss", 4.0)],
            [("lr", float("nan"))], None, [("loss", 5.0)]]
    column = chunked(maps, pa.map_(pa.string(), pa.float64()))
    rows, codes, values = map_entries(column, ["loss", "lr"])
    expected = [(r, ["loss", "lr"].index(k), np.nan if v is None else v)
                for r, m in enumerate(maps) for k, v in (m or []) if k in ("loss", "lr")]
    assert rows.tolist() == [e[0] for e in expected] and codes.tolist() == [e[1] for e in expected]
    np.testing.assert_array_equal(values, [e[2] for e in expected])


def test_typed_arrays_equal_pyarrows_own():
    cases = [([0, -1, 2**63 - 1, -2**63], pa.int64()), ([0.5, float("inf"), -0.0], pa.float64()),
             (["step", "", "é", "genesis"], pa.string()), ([bytes([i]) * 32 for i in range(3)], pa.binary(32)),
             ([[("loss", 1.0), ("lr", 2.0)], [], [("loss", 3.0)]], pa.map_(pa.string(), pa.float64()))]
    for values, type_ in cases:
        built = typed_array(values, type_)
        built.validate(full=True)
        assert built.equals(pa.array(values, type_)), type_
        assert typed_array(values[:0], type_).equals(pa.array(values[:0], type_))
    with pytest.raises(OverflowError):
        typed_array([2**63], pa.int64())
    with pytest.raises(ValueError):
        typed_array([b"short"], pa.binary(32))


CRASHED = r"""
import os, sys
from ledger import LedgerWriter, Signer
writer = LedgerWriter.create(sys.argv[1], Signer.from_seed(bytes(range(32))), genesis={"config": {}},
                             rollover_entries=8)
for i in range(13):
    writer.append("step", i, {"metrics": {"loss": 1.0 / (i + 1)}})
os._exit(0)  # a crash: entries 8-13 stay in the log
"""

VERIFY = r"""
import sys
from ledger._cli import cli
ledger, key, model, crashed = sys.argv[1:]
for path, extra in ((ledger, ["--model", model]), (ledger, []), (ledger, ["--json", "--sample", "3"]), (crashed, [])):
    try:
        cli(["verify", path, "--key", key, *extra])
    except SystemExit as exc:
        assert exc.code == 0, (path, extra, exc.code)
print("pandas imported:", "pandas" in sys.modules)
"""


def test_verify_of_a_recorded_ledger_imports_no_pandas(tmp_path: Path):
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from recipes import TinyRecipe

    from ledger import Signer
    from ledger._crypto import public_key_pem
    from ledger.hooks import train

    signer = Signer.from_seed(bytes(range(32)))
    train(TinyRecipe(), steps=6, path=tmp_path / "L", key=signer, seed=3, checkpoint_every=2,
          final_weights=tmp_path / "final.safetensors")
    (tmp_path / "pub.pem").write_bytes(public_key_pem(signer.public.raw))
    subprocess.run([sys.executable, "-c", CRASHED, str(tmp_path / "crashed")], check=True, timeout=120)
    assert (tmp_path / "crashed" / "wal.log").stat().st_size > 1000  # the unsealed ledger has a log tail
    done = subprocess.run([sys.executable, "-c", VERIFY, str(tmp_path / "L"), str(tmp_path / "pub.pem"),
                           str(tmp_path / "final.safetensors"), str(tmp_path / "crashed")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "pandas imported: False"
