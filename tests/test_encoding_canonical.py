"""The one-pass deterministic-encoding check accepts exactly what decoding and re-encoding accepts.

``decode_body`` used to prove a body canonical by re-encoding the decoded value and comparing bytes
(the reference below, kept here as the definition). ``check_canonical`` decides the same without
building or re-encoding anything; these tests hold the two to the same verdict on valid bodies, on
every mutation of them a seeded generator makes, on known non-canonical forms, on every float width
and around the nesting limit.
"""

from __future__ import annotations

import random
import struct

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger._canonical import check_canonical
from ledger._encoding import _tag_hook, encode_body
from ledger.errors import FormatError
from ledger.format import decode_body

leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**100), max_value=2**100)
          | st.floats(allow_nan=True, allow_infinity=True, width=16) | st.floats(width=32) | st.floats()
          | st.text(max_size=30) | st.binary(max_size=30)
          | st.lists(st.floats(width=32), max_size=6).map(lambda v: np.array(v, dtype=np.float32))
          | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(lambda v: np.array(v, dtype=np.int64)))
bodies = st.dictionaries(st.text(max_size=30), st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=30), inner, max_size=4),
    max_leaves=20), max_size=8)


def reference(data: bytes) -> bool:
    """The former rule: decodes to a map that re-encodes to the same bytes."""
    try:
        body = cbor2.loads(data, tag_hook=_tag_hook, max_depth=66, allow_indefinite=False,
                           allow_duplicate_keys=False)
        return isinstance(body, dict) and encode_body(body) == data
    except Exception:
        return False


def accepted(data: bytes) -> bool:
    try:
        decode_body(data)
        return True
    except FormatError:
        return False


def mutants(data: bytes, rng: random.Random, n: int) -> list[bytes]:
    """Byte flips, replaced, inserted and deleted bytes, truncations and appended bytes."""
    out = []
    for _ in range(n):
        b = bytearray(data)
        op, i = rng.randrange(6), rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            b.insert(i, rng.randrange(256))
        elif op == 3:
            del b[i]
        elif op == 4:
            del b[i:]
        else:
            b += bytes([rng.randrange(256)])
        out.append(bytes(b))
    return out


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_every_written_body_is_canonical(body):
    data = encode_body(body)
    check_canonical(data)
    assert accepted(data)


@settings(max_examples=150, deadline=None)
@given(bodies, st.integers(0, 2**32))
def test_mutated_bodies_get_the_reference_verdict(body, seed):
    data = encode_body(body)
    for mutant in mutants(data, random.Random(seed), 40):
        assert accepted(mutant) == reference(mutant), mutant.hex()


def test_mutated_recorded_bodies_get_the_reference_verdict():
    rng = random.Random(0)
    step = encode_body({"lrs": np.array([1e-3]), "norms": np.array([3.2, 0.7, 0.5, 0.04]),
                        "carries": ["norms", "batch"], "metrics": {"lr": 0.001, "loss": 0.734, "grad_norm": 1.23},
                        "grad_norms": np.array([1.23]), "batch_digest": bytes(range(32)), "optimizer_steps": 1,
                        "sketch": np.linspace(-1, 1, 16, dtype=np.float32), "hyper": [{"betas": [0.9, 0.999]}]})
    for mutant in mutants(step, rng, 20_000):
        assert accepted(mutant) == reference(mutant), mutant.hex()


NON_CANONICAL = {
    "1 in a one-byte head": "a161611801",
    "1 in a two-byte head": "a16161190001",
    "1 in a four-byte head": "a161611a00000001",
    "255 in a two-byte head": "a1616119 00ff",
    "2^32-1 in an eight-byte head": "a161611b00000000ffffffff",
    "-1 in a one-byte head": "a161613800",
    "key length in a one-byte head": "a1780161 01",
    "text length in a two-byte head": "a16161790001 62",
    "bytes length in a one-byte head": "a16161580100",
    "array length in a one-byte head": "a16161980100",
    "map length in a one-byte head": "b80161 6101",
    "typed-array tag in a two-byte head": "a16161d9005540",
    "keys out of order": "a2616201616101",
    "longer key first": "a2626161016162 01",
    "duplicate keys": "a2616101616101",
    "non-text key": "a10101",
    "byte-string key": "a1416101",
    "indefinite map": "bf616101ff",
    "indefinite array": "a161619f01ff",
    "indefinite text": "a161617f6161ff",
    "indefinite bytes": "a161615f4101ff",
    "1.5 as a single": "a16161fa3fc00000",
    "1.5 as a double": "a16161fb3ff8000000000000",
    "a single-exact value as a double": "a16161fb3fb99999a0000000",
    "0.0 as a double": "a16161fb0000000000000000",
    "-0.0 as a single": "a16161fa80000000",
    "inf as a single": "a16161fa7f800000",
    "-inf as a double": "a16161fbfff0000000000000",
    "NaN as a single": "a16161fa7fc00000",
    "NaN as a double": "a16161fb7ff8000000000000",
    "NaN with a payload": "a16161f97e01",
    "NaN with the sign bit": "a16161f9fe00",
    "signalling NaN": "a16161f97d00",
    "smallest half subnormal as a single": "a16161fa33800000",
    "bignum below 2^64": "a16161c24801000000000000 00",
    "bignum with a leading zero": "a16161c24a00010000000000000000",
    "negative bignum below 2^64": "a16161c34100",
    "bignum over text": "a16161c2696161616161616161 61",
    "datetime tag": "a16161c11a00000000",
    "self-describe tag": "d9d9f7a1616101",
    "shareable tag": "a16161d81c8101",
    "undefined": "a16161f7",
    "simple value 16": "a16161f0",
    "one-byte simple value": "a16161f820",
    "one-byte simple value for true": "a16161f815",
    "typed array of odd length": "a16161d85543000000",
    "typed array over text": "a16161d8556141",
    "trailing bytes": "a161610100",
    "two maps": "a1616101a1616101",
    "not a map": "8101",
    "empty": "",
}


@pytest.mark.parametrize("name", NON_CANONICAL)
def test_known_non_canonical_bodies_are_refused(name):
    data = bytes.fromhex(NON_CANONICAL[name].replace(" ", ""))
    assert not reference(data), name  # the former rule refused it too
    with pytest.raises(FormatError):
        decode_body(data)


def _float_encodings(value: float) -> list[bytes]:
    out = [b"\xfb" + struct.pack(">d", value)]
    for head, fmt in ((b"\xfa", ">f"), (b"\xf9", ">e")):
        try:
            packed = struct.pack(fmt, value)
        except OverflowError:
            continue
        if struct.unpack(fmt, packed)[0] == value or (value != value):
            out.append(head + packed)
    return out


def test_floats_only_in_their_shortest_exact_width():
    rng = np.random.default_rng(0)
    values = [float(v) for v in rng.integers(0, 2**64, 3000, dtype=np.uint64).view(np.float64)]
    values += [float(v) for v in rng.integers(0, 2**32, 3000, dtype=np.uint32).view(np.float32)]
    values += [float(v) for v in np.arange(2**16, dtype=np.uint16).view(np.float16)]
    values += [2.0**-149, 2.0**-24, 2.0**-25, 65504.0, 65520.0, 3.4028234663852886e38, 1e300, -0.0]
    for value in values:
        canonical = cbor2.dumps(value, canonical=True)
        for encoding in _float_encodings(value):
            data = b"\xa1\x61a" + encoding
            assert accepted(data) == (encoding == canonical) == reference(data), (value, encoding.hex())
    for bits in range(0x7C00, 0x10000):  # every half infinity and NaN, both signs
        if bits & 0x7C00 == 0x7C00:
            data = b"\xa1\x61a\xf9" + bits.to_bytes(2, "big")
            assert accepted(data) == reference(data), hex(bits)


@pytest.mark.parametrize("leaf", ["00", "80", "a0", "d85540", "c249010000000000000000", "f97e00"])
def test_nesting_limit_as_before(leaf):
    for depth in range(58, 70):
        for wrap in ("81", "a16161"):
            data = bytes.fromhex("a16161" + wrap * depth + leaf)
            assert accepted(data) == reference(data), (depth, wrap, leaf)


def test_hostile_lengths_are_refused_without_looping():
    huge = b"\xa1\x61a\x9b" + (1 << 60).to_bytes(8, "big")
    with pytest.raises(FormatError):
        check_canonical(huge)
    with pytest.raises(FormatError):
        check_canonical(b"\xa1\x61a\xbb" + (1 << 60).to_bytes(8, "big"))
