"""``check_canonical`` remembers the shapes of bodies it accepted and then checks only the floats of a
body of a known shape: it must decide every body, and word every refusal, exactly as the full scan
does — on bodies that differ from a remembered one in any byte, payload or not."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from test_encoding_canonical import bodies

from ledger import _canonical
from ledger._canonical import check_canonical, payloads
from ledger._encoding import encode_body
from ledger.errors import FormatError


def _verdict(data: bytes) -> str:
    try:
        check_canonical(data)
        return "ok"
    except FormatError as exc:
        return str(exc)


def _fresh(data: bytes) -> str:
    """The verdict of the full scan (no shape remembered)."""
    saved = dict(_canonical._SHAPES)
    _canonical._SHAPES.clear()
    try:
        return _verdict(data)
    finally:
        _canonical._SHAPES.clear()
        _canonical._SHAPES.update(saved)


def _same_length_mutants(data: bytes, rng: random.Random) -> list[bytes]:
    """Each payload overwritten with random bytes or with its own special values, and random bytes
    changed anywhere."""
    out = []
    for p in payloads(data):
        specials = [rng.randbytes(p.size)]
        if p.info:  # floats: narrower-exact values, infinities, NaNs of every kind
            fmt = {25: ">e", 26: ">f", 27: ">d"}[p.info]
            specials += [struct.pack(fmt, v) for v in (0.0, -0.0, 0.5, 1.0, float("inf"), float("nan"), 65504.0)]
            specials += [bytes([0x7F, 0xFF] + [0xFF] * (p.size - 2)), bytes([0x7E] + [0] * (p.size - 1))]
        out += [data[:p.start] + s + data[p.start + p.size:] for s in specials]
    for _ in range(20):
        b = bytearray(data)
        b[rng.randrange(len(b))] = rng.randrange(256)
        out.append(bytes(b))
    return out


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_a_remembered_shape_decides_as_the_full_scan(body):
    data = encode_body(body)
    check_canonical(data)  # remembered (if within the bounds)
    rng = random.Random(data)
    for mutant in _same_length_mutants(data, rng):
        assert _verdict(mutant) == _fresh(mutant)


def test_shapes_stay_within_their_bounds():
    _canonical._SHAPES.clear()
    for n in range(3 * _canonical._SHAPES_PER_LENGTH):  # one length, many shapes
        check_canonical(encode_body({f"k{n:02d}": n + 1000}))
    assert len(_canonical._SHAPES) == 1 and len(next(iter(_canonical._SHAPES.values()))) == \
        _canonical._SHAPES_PER_LENGTH
    check_canonical(encode_body({"big": b"x" * (_canonical._SHAPE_BYTES + 1)}))
    assert len(_canonical._SHAPES) == 1


@pytest.mark.parametrize("value", [0.1, 1e300, float("nan"), 2.0**-149, 2.0**-1074])
def test_floats_of_a_known_shape_are_checked(value):
    base = encode_body({"loss": 0.1, "norms": b"\x00" * 8})
    check_canonical(base)
    pos = base.index(b"\xfb") + 1
    mutant = base[:pos] + struct.pack(">d", value) + base[pos + 8:]
    assert _verdict(mutant) == _fresh(mutant)
