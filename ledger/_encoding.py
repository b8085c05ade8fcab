"""Deterministic CBOR for record bodies (RFC 8949 §4.2.1 core deterministic encoding).

Pure bytes-in/bytes-out. Rules (normative text in docs/FORMAT.md §3):

- maps have text keys only, sorted bytewise by their encoded form (shortest key first);
- integers use the shortest head; beyond 64 bits they become bignums (tags 2/3);
- floats use the shortest of half/single/double that keeps the value exactly; NaN is always
  the half-precision quiet NaN ``f97e00`` (payloads are not kept); ±Inf are ``f97c00``/``f9fc00``;
  ``-0.0`` keeps its sign (``f98000``);
- 1-D numeric arrays are RFC 8746 typed arrays (little-endian), e.g. tag 85 for float32;
- numpy scalars and 0-d tensors are converted to Python numbers first; anything else
  (sets, objects, datetimes, multi-dimensional arrays) is refused: encoding raises
  :class:`~ledger.errors.ConfigurationError` (the caller's mistake), decoding
  :class:`~ledger.errors.FormatError` (damaged or crafted bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cbor2
import numpy as np

from ledger._canonical import MAX_DEPTH as _MAX_DEPTH
from ledger._canonical import TYPED_ARRAY_TAGS, check_canonical
from ledger.errors import ConfigurationError, FormatError

_TAG_DTYPES: dict[int, np.dtype[Any]] = {
    tag: np.dtype(name).newbyteorder("<") for name, tag in TYPED_ARRAY_TAGS.items()
}
_DTYPE_TAGS: dict[np.dtype[Any], int] = {np.dtype(name): tag for name, tag in TYPED_ARRAY_TAGS.items()}

# A body decodes to Python objects of up to ~64 bytes per encoded byte (an empty array is one byte,
# an empty list 56): bodies above _SCAN_FROM bytes are scanned first and refused beyond MAX_ITEMS items.
MAX_ITEMS = 1 << 21
_SCAN_FROM = 64 << 10


_PLAIN = (type(None), bool, str, bytes, int, float)


def normalize(value: Any, _depth: int = 0) -> Any:
    """Return ``value`` with every leaf converted to a type the body encoding allows.

    numpy scalars and 0-d tensors become Python numbers; 1-D numpy arrays and tensors become
    typed arrays; tuples become lists. Raises :class:`ConfigurationError` for anything else.
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    if _depth > _MAX_DEPTH:
        raise ConfigurationError("record body nested deeper than 64 levels")
    if kind is dict or isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise ConfigurationError(f"record body map keys must be text, got {type(key).__name__}")
            out[key] = item if type(item) in _PLAIN else normalize(item, _depth + 1)
        return out
    if kind is list or kind is tuple:
        return [item if type(item) in _PLAIN else normalize(item, _depth + 1) for item in value]
    if kind is np.ndarray:
        return _array_tag(value)
    if isinstance(value, (bool, str, bytes, int, float)):  # subclasses (IntEnum, numpy float64 …)
        return value.item() if isinstance(value, np.generic) else _plain(value)
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.generic):
        return normalize(value.item(), _depth)
    if isinstance(value, np.ndarray):
        return _array_tag(value)
    if _is_tensor(value):
        return normalize(_tensor_to_numpy(value), _depth)
    raise ConfigurationError(f"cannot encode a {type(value).__name__} in a record body")


def _plain(value: Any) -> Any:
    for base in (bool, int, float, str, bytes):
        if isinstance(value, base):
            return base(value)  # type: ignore[arg-type]
    raise ConfigurationError(f"cannot encode a {type(value).__name__} in a record body")


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _tensor_to_numpy(value: Any) -> Any:
    tensor = value.detach()
    if tensor.dim() == 0:
        return tensor.item()
    if str(tensor.dtype) == "torch.bfloat16":  # no numpy dtype: widen (exactly) to float32
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _array_tag(array: np.ndarray) -> Any:
    if array.ndim == 0:
        return normalize(array.item())
    if array.ndim != 1:
        raise ConfigurationError("only 1-D arrays can be encoded; flatten it and store the shape")
    tag = _DTYPE_TAGS.get(array.dtype)
    if tag is None:
        tag = _DTYPE_TAGS.get(array.dtype.newbyteorder("="))
        if tag is None:
            raise ConfigurationError(f"arrays of dtype {array.dtype} cannot be encoded")
    return cbor2.CBORTag(tag, array.astype(_TAG_DTYPES[tag], copy=False).tobytes())


def encode_body(body: Mapping[str, Any]) -> bytes:
    """Encode a record body (a map) in core deterministic CBOR."""
    if not isinstance(body, Mapping):
        raise ConfigurationError("a record body must be a map")
    try:
        return cbor2.dumps(normalize(body), canonical=True)
    except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"cannot encode record body: {exc}") from exc


def _tag_hook(*args: Any) -> Any:
    # cbor2 5.x calls hook(decoder, tag); 6.x calls hook(tag, immutable).
    tag = args[0] if isinstance(args[0], cbor2.CBORTag) else args[1]
    dtype = _TAG_DTYPES.get(tag.tag)
    if dtype is None or not isinstance(tag.value, bytes):
        raise FormatError(f"unknown CBOR tag {tag.tag} in record body")
    if len(tag.value) % dtype.itemsize:
        raise FormatError(f"typed array (tag {tag.tag}) length is not a multiple of its item size")
    return np.frombuffer(tag.value, dtype=dtype).astype(dtype.newbyteorder("="))


def decode_body(data: bytes, *, check_deterministic: bool = True) -> dict[str, Any]:
    """Decode a record body; with ``check_deterministic`` refuse any non-canonical encoding.

    Typed arrays come back as read-only-safe numpy arrays (native byte order). Anything that is not
    such a body — wrong types, truncation, indefinite lengths, nesting beyond 64 levels, more than
    :data:`MAX_ITEMS` data items — raises :class:`FormatError`, in time and memory proportional to
    ``len(data)``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FormatError(f"a record body is bytes, not a {type(data).__name__}")
    data = bytes(data)
    if len(data) > _SCAN_FROM:
        _count_items(data)
    if check_deterministic:
        check_canonical(data)
    try:
        body = cbor2.loads(data, tag_hook=_tag_hook, max_depth=_MAX_DEPTH + 2,
                           allow_indefinite=False, allow_duplicate_keys=False)
    except FormatError:
        raise
    except MemoryError:
        raise FormatError(f"record body of {len(data)} bytes could not be decoded within this process's memory") \
            from None
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise FormatError(f"record body is not valid CBOR: {exc}") from exc
    except BaseException as exc:  # cbor2's Rust core panics (pyo3 PanicException) when allocation fails
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise FormatError(f"record body of {len(data)} bytes could not be decoded ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise FormatError("record body is not a map")
    return body


def _count_items(data: bytes) -> int:
    """Count the data items of a CBOR item without building them; refuse more than MAX_ITEMS, a
    length longer than the bytes left, and indefinite lengths."""
    pos, end, pending, items = 0, len(data), 1, 0
    while pending:
        if pending > end - pos:  # every pending item takes at least one byte
            raise FormatError("record body is not valid CBOR: it ends inside an item")
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 31
        if info < 24:
            arg = info
        elif info < 28:
            size = 1 << (info - 24)
            arg = int.from_bytes(data[pos:pos + size], "big")
            pos += size
        else:
            raise FormatError("record body is not valid CBOR: indefinite length or reserved value")
        pending -= 1
        items += 1
        if items > MAX_ITEMS:
            raise FormatError(f"record body holds more than {MAX_ITEMS} data items")
        if major in (2, 3):
            pos += arg
        elif major == 4:
            pending += arg
        elif major == 5:
            pending += 2 * arg
        elif major == 6:
            pending += 1
    return items


def metric_value(value: Any) -> float:
    """Convert a metric (float, int, numpy scalar, 0-d tensor) to a Python float."""
    value = normalize(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"a metric must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ConfigurationError(f"a metric must fit a float64, got {value}") from None


def floats_equal(a: float, b: float) -> bool:
    """Equality that treats NaN as equal to NaN and keeps the sign of zero."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
