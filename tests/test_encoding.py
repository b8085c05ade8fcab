"""The deterministic CBOR body encoding: exact bytes, round trips, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import ConfigurationError, FormatError
from ledger.format import decode_body, encode_body

leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**100), max_value=2**100)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text() | st.binary())
bodies = st.dictionaries(st.text(), st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                                                 | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20),
                         max_size=8)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@given(bodies)
def test_round_trip_is_exact_and_canonical(body):
    data = encode_body(body)
    decoded = decode_body(data)
    assert _same(decoded, {k: (list(v) if isinstance(v, tuple) else v) for k, v in body.items()})
    assert encode_body(decoded) == data


@given(st.dictionaries(st.text(), st.integers(), min_size=2, max_size=10))
def test_key_order_does_not_matter(body):
    reordered = dict(reversed(list(body.items())))
    assert encode_body(body) == encode_body(reordered)


@pytest.mark.parametrize("value, hex_", [
    (float("nan"), "f97e00"), (float("inf"), "f97c00"), (float("-inf"), "f9fc00"),
    (-0.0, "f98000"), (0.0, "f90000"), (1.5, "f93e00"), (0.1, "fb3fb999999999999a"),
    (2**64, "c249010000000000000000"), (-(2**64) - 1, "c349010000000000000000"), (2**64 - 1, "1bffffffffffffffff"),
    (b"\x01\x02", "420102"), ("é", "62c3a9"),
])
def test_documented_scalar_encodings(value, hex_):
    # docs/FORMAT.md §3 states these bytes; a map {"v": value} is a1 61 76 ‖ value
    assert encode_body({"v": value}).hex() == "a16176" + hex_


def test_keys_sorted_shortest_first_then_bytewise():
    assert encode_body({"b": 1, "aa": 2, "a": 3, "é": 4}).hex() == "a46161036162016261610262c3a904"


def test_nan_payload_is_not_kept():
    quiet_with_payload = np.frombuffer(np.array([0x7FF8000000000123], dtype=np.uint64).tobytes(), np.float64)[0]
    assert encode_body({"v": float(quiet_with_payload)}) == encode_body({"v": float("nan")})


def test_numpy_and_arrays():
    body = {"s": np.float32(0.5), "i": np.int64(3), "a": np.arange(3, dtype=np.float32)}
    data = encode_body(body)
    # tag 85 (d8 55): RFC 8746 float32 little-endian typed array
    assert "d8554c0000000000" in data.hex()
    out = decode_body(data)
    assert out["s"] == 0.5 and out["i"] == 3
    assert out["a"].dtype == np.float32 and out["a"].tolist() == [0.0, 1.0, 2.0]


def test_tensors_are_converted():
    torch = pytest.importorskip("torch")
    body = {"x": torch.tensor(2.5), "v": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, dtype=torch.bfloat16)}
    out = decode_body(encode_body(body))
    assert out["x"] == 2.5 and out["v"].tolist() == [0, 1, 2, 3] and out["b"].dtype == np.float32


@pytest.mark.parametrize("bad", [{1: "int key"}, {"s": {1, 2}}, {"o": object()}, {"m": np.zeros((2, 2))},
                                 {"c": np.zeros(2, dtype=np.complex64)}])
def test_refuses_what_it_cannot_encode_deterministically(bad):
    with pytest.raises(ConfigurationError):  # the caller's mistake, not damaged evidence
        encode_body(bad)


@pytest.mark.parametrize("data", [
    bytes.fromhex("a2616101616102"),        # duplicate key
    bytes.fromhex("a1616afb3ff8000000000000"),  # 1.5 as a double: not the shortest form
    bytes.fromhex("bf616101ff"),            # indefinite-length map
    bytes.fromhex("a2616201616101"),        # keys out of order
    bytes.fromhex("a161611801"),            # 1 encoded in two bytes
    bytes.fromhex("a1616101ff"),            # trailing bytes
    b"\xff\x00", b"",
])
def test_decoder_refuses_non_deterministic_or_invalid_bodies(data):
    with pytest.raises(FormatError):
        decode_body(data)
