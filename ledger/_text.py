"""Text safe to print: paths and messages from hostile input on any terminal and stream encoding."""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: object, controls: bool = True) -> str:
    """``value`` as text safe to print: the undecodable bytes of a path (surrogate escapes) as
    ``\\xff``; with ``controls``, control characters and line breaks as ``\\n``, ``\\x1b``,
    ``\\u2028`` (so a one-line message stays one line)."""
    text = str(value)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if controls:
        text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text


__all__ = ["printable"]
