"""The deterministic-encoding check of a record body, in one pass over its bytes.

Pure bytes-in: :func:`check_canonical` accepts exactly the bodies that :func:`ledger._encoding.encode_body`
writes again byte for byte after decoding (docs/FORMAT.md §3) and raises
:class:`~ledger.errors.FormatError` for any other, without building the decoded values. Whether
text is valid UTF-8 is left to the decoder that runs after it. Time is linear in the body's length
(every item takes at least one byte; a length longer than the bytes left is refused before any
loop), memory is proportional to the nesting depth (at most 64 levels).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ledger.errors import FormatError

# RFC 8746 §2.1 typed-array tags (little-endian) and their item sizes in bytes.
TYPED_ARRAY_TAGS: dict[str, int] = {
    "uint8": 64, "uint16": 69, "uint32": 70, "uint64": 71, "int8": 72, "int16": 77, "int32": 78, "int64": 79,
    "float16": 84, "float32": 85, "float64": 86,
}
_ITEM_SIZE = {tag: int("".join(filter(str.isdigit, name))) // 8 for name, tag in TYPED_ARRAY_TAGS.items()}
MAX_DEPTH = 64  # a map, array or typed array deeper than this (the body itself at 0) is refused
_SHORTEST = (24, 1 << 8, 1 << 16, 1 << 32)  # the least argument each of the 1/2/4/8-byte heads may carry
_HALF, _SINGLE, _DOUBLE = struct.Struct(">e"), struct.Struct(">f"), struct.Struct(">d")
_HALF_NAN = 0x7E00
_FALSE_TRUE_NULL = (20, 21, 22)


def check_canonical(data: bytes) -> None:
    """Refuse (``FormatError``) ``data`` unless it is one CBOR map in the body's deterministic
    encoding: definite lengths, shortest heads, text keys in strictly increasing encoded order,
    shortest exact floats with the one NaN ``f97e00``, only typed-array and bignum tags, only
    false/true/null as simple values, at most 64 levels deep, nothing after the map.

    A body of the same shape as one accepted before (:class:`_Shape`) is accepted after checking
    only its floats."""
    for shape in _SHAPES.get(len(data), ()):
        if shape.matches(data):
            return
    if not data or data[0] >> 5 != 5:
        raise FormatError("record body is not a map")
    if _scan(data, 0, 1, 0, False) != len(data):
        raise _bad("bytes follow the body's map")
    _remember(data)


class Payload(NamedTuple):
    """Bytes of a canonical body that may change without changing its structure or its length: a
    float's value (``info`` 25/26/27: its width), a byte string's contents, or a typed array's
    (``tag``); ``key`` is the top-level key it lies under, ``depth`` how far below it."""

    start: int
    size: int
    key: str
    depth: int
    info: int = 0  # floats: the head's additional information (25, 26, 27)
    tag: int | None = None  # typed arrays: the tag


def payloads(data: bytes) -> list[Payload]:
    """The payloads of a body :func:`check_canonical` accepted, in order."""
    out: list[Payload] = []
    pos, count = _head(data, 0)
    for _ in range(count):
        start, size = _head(data, pos)
        pos = _payloads(data, start + size, data[start:start + size].decode(errors="replace"), 0, out)
    return out


def _head(data: bytes, pos: int) -> tuple[int, int]:
    """(position after the head, its argument) of the definite-length head at ``pos``."""
    info = data[pos] & 31
    if info < 24:
        return pos + 1, info
    size = 1 << (info - 24)
    return pos + 1 + size, int.from_bytes(data[pos + 1:pos + 1 + size], "big")


def _payloads(data: bytes, pos: int, key: str, depth: int, out: list[Payload]) -> int:
    """Collect the payloads of the item at ``pos``; returns its end."""
    major, info = data[pos] >> 5, data[pos] & 31
    if major == 7 and info >= 25:
        width = 1 << (info - 24)
        out.append(Payload(pos + 1, width, key, depth, info=info))
        return pos + 1 + width
    after, arg = _head(data, pos)
    if major == 2:
        out.append(Payload(after, arg, key, depth))
    if major in (2, 3):
        return after + arg
    if major in (4, 5):
        for _ in range(arg * (major - 3)):
            after = _payloads(data, after, key, depth + 1, out)
        return after
    if major != 6:
        return after
    start, length = _head(data, after)  # a tag over a byte string
    if arg in _ITEM_SIZE:
        out.append(Payload(start, length, key, depth, tag=arg))
    return start + length  # a bignum's bytes are part of its shape


class _Shape:
    """An accepted body with its payloads left open: another body of the same length whose other
    bytes are the same, and whose floats are each in their shortest exact width, is in the
    deterministic encoding too (the same heads, keys, tags and simple values in the same places)."""

    def __init__(self, data: bytes) -> None:
        runs, floats, at = [], [], 0
        for p in payloads(data):
            runs.append((at, data[at:p.start]))
            at = p.start + p.size
            if p.info:
                floats.append((p.start, p.info))
        runs.append((at, data[at:]))
        self.runs = tuple((start, run) for start, run in runs if run)
        self.floats = tuple(floats)

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` (of the shape's length) is a body of this shape."""
        if not all(data.startswith(run, start) for start, run in self.runs):
            return False
        try:
            for pos, info in self.floats:
                _simple(data, pos, info)
        except FormatError:
            return False
        return True


_SHAPES: dict[int, tuple[_Shape, ...]] = {}  # by body length
_SHAPE_BYTES = 16 << 10  # bodies up to this long are remembered …
_SHAPE_LENGTHS, _SHAPES_PER_LENGTH = 1024, 4  # … up to these many


def _remember(data: bytes) -> None:
    """Keep the shape of an accepted body (within the bounds above)."""
    known = _SHAPES.get(len(data), ())
    if len(data) <= _SHAPE_BYTES and len(known) < _SHAPES_PER_LENGTH and (known or len(_SHAPES) < _SHAPE_LENGTHS):
        _SHAPES[len(data)] = (*known, _Shape(bytes(data)))


def _invalid(why: str) -> FormatError:
    return FormatError(f"record body is not valid CBOR: {why}")


def _bad(why: str) -> FormatError:
    return FormatError(f"record body is not in deterministic encoding: {why}")


def _scan(data: bytes, pos: int, count: int, depth: int, keyed: bool) -> int:
    """Check ``count`` consecutive items from ``pos`` at nesting ``depth`` (every other one a map
    key when ``keyed``); returns the position after them."""
    end = len(data)
    previous = b""
    for n in range(count):
        if pos >= end:
            raise _invalid("it ends inside an item")
        start = pos
        initial = data[pos]
        major, info = initial >> 5, initial & 31
        pos += 1
        if info < 24:
            arg = info
        elif info < 28:
            size = 1 << (info - 24)
            if pos + size > end:
                raise _invalid("it ends inside an item")
            if major == 7:
                _simple(data, pos, info)
                pos += size
                if keyed and not n & 1:
                    raise _bad("a map key that is not text")
                continue
            arg = int.from_bytes(data[pos:pos + size], "big")
            pos += size
            if arg < _SHORTEST[info - 24]:
                raise _bad("a head longer than needed")
        else:
            raise _invalid("indefinite length or reserved value")
        if keyed and not n & 1:
            if major != 3:
                raise _bad("a map key that is not text")
            pos += arg
            if pos > end:
                raise _invalid("it ends inside an item")
            key = data[start:pos]
            if key <= previous:
                raise _bad("map keys out of order or repeated")
            previous = key
        elif major <= 1:
            continue
        elif major <= 3:
            pos += arg
            if pos > end:
                raise _invalid("it ends inside an item")
        elif major == 7:
            if arg not in _FALSE_TRUE_NULL:
                raise _bad("a simple value other than false, true and null")
        elif major == 6:
            if depth > MAX_DEPTH and arg in _ITEM_SIZE:
                raise _bad(f"nested deeper than {MAX_DEPTH} levels")
            pos = _tagged(data, pos, arg)
        elif depth > MAX_DEPTH:
            raise _bad(f"nested deeper than {MAX_DEPTH} levels")
        elif major == 4:
            if arg > end - pos:
                raise _invalid("it ends inside an item")
            pos = _scan(data, pos, arg, depth + 1, False)
        else:
            if 2 * arg > end - pos:
                raise _invalid("it ends inside an item")
            pos = _scan(data, pos, 2 * arg, depth + 1, True)
    return pos


def _simple(data: bytes, pos: int, info: int) -> None:
    """A float must be in its shortest exact width (NaN only as ``f97e00``); one-byte simple
    values are refused."""
    if info == 24:
        raise _bad("a simple value other than false, true and null")
    if info == 25:
        bits = (data[pos] << 8) | data[pos + 1]
        if bits & 0x7C00 == 0x7C00 and bits & 0x3FF and bits != _HALF_NAN:
            raise _bad("a NaN other than f97e00")
        return
    value = (_SINGLE if info == 26 else _DOUBLE).unpack_from(data, pos)[0]
    if value != value:
        raise _bad("a NaN other than f97e00")
    narrower = _HALF if info == 26 else _SINGLE
    try:
        fits = narrower.unpack(narrower.pack(value))[0] == value
    except OverflowError:  # beyond the narrower width's range
        fits = False
    if fits:
        raise _bad("a float wider than needed")


def _tagged(data: bytes, pos: int, tag: int) -> int:
    """The item a tag holds: a byte string of whole items for a typed array, a byte string without
    leading zeros beyond 64 bits for a bignum (tags 2, 3); no other tag."""
    size = _ITEM_SIZE.get(tag)
    if size is None and tag not in (2, 3):
        raise _bad(f"tag {tag}, which the format does not allow")
    end = len(data)
    if pos >= end:
        raise _invalid("it ends inside an item")
    initial = data[pos]
    if initial >> 5 != 2:
        raise _bad(f"tag {tag} over something other than a byte string")
    info = initial & 31
    pos += 1
    if info < 24:
        length = info
    elif info < 28:
        width = 1 << (info - 24)
        if pos + width > end:
            raise _invalid("it ends inside an item")
        length = int.from_bytes(data[pos:pos + width], "big")
        pos += width
        if length < _SHORTEST[info - 24]:
            raise _bad("a head longer than needed")
    else:
        raise _invalid("indefinite length or reserved value")
    if length > end - pos:
        raise _invalid("it ends inside an item")
    if size is not None:
        if length % size:
            raise FormatError(f"typed array (tag {tag}) length is not a multiple of its item size")
    elif length < 9 or data[pos] == 0:
        raise _bad("a bignum that fits 64 bits or has leading zeros")
    return pos + length
