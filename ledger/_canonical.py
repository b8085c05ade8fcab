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
    false/true/null as simple values, at most 64 levels deep, nothing after the map."""
    if not data or data[0] >> 5 != 5:
        raise FormatError("record body is not a map")
    if _scan(data, 0, 1, 0, False) != len(data):
        raise _bad("bytes follow the body's map")


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
