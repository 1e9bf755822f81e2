"""Text from a cassette or a sender, made safe to show: on a terminal, in a log line."""

from __future__ import annotations

import re
from typing import Any

# What a terminal would act on rather than show: C0 and C1 control characters and DEL (ESC
# sequences move the cursor, retitle the window, hide text), the bidirectional overrides and
# line separators (they reorder or break the line), and lone surrogates (not printable at all).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
                          "\ud800-\udfff]")


def _escape_char(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: Any, limit: int | None = None) -> str:
    """``text`` (its ``repr`` if it is no string) with every character a terminal would act on
    written as its escape (``\\x1b``, ``\\u202e``): shown, never obeyed; cut at ``limit``
    characters when given.

        >>> printable("GET /\\x1b[2J")
        'GET /\\\\x1b[2J'
    """
    s = text if type(text) is str else repr(text)
    if limit is not None and len(s) > limit:
        s = s[:limit] + "..."
    return _UNPRINTABLE.sub(_escape_char, s)
