"""JSON between circles' own processes: a worker's replies to the server, the frames between a
worker and its engine children. orjson (C, a tenth of the standard library's time on these small
objects, three to five of them a play) wherever it gives what ``json`` gives; ``json`` where it
would not: text orjson refuses (a lone surrogate escaped, NaN), integers beyond 64 bits (orjson
reads them as floats and refuses to write them). Either way the same values come out.

:func:`too_deep` is asked before either decoder sees text from elsewhere (here, JSON-RPC
messages, webhook bodies): json's C decoder recurses once a level.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

import orjson

#: Every ASCII digit as "0": 19 digits in a row then show as :data:`_LONG_RUN`.
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_RUN = b"0" * 19

MAX_DEPTH = 256  # arrays/objects inside one another (a JSON-RPC batch's array included)
# A string, or an unterminated one to the end of the text (a lone backslash last included), so a
# match that starts at a quote never fails. Were the closing quote required, a text of one quote
# and then escaped quotes (\"\"\"...) would be scanned to its end from every quote in turn:
# quadratic work (a 32 KB message took seconds, a 1 MiB one hours). An unterminated string is
# invalid JSON anyway, and nothing after it can nest.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def too_deep(text: str | bytes) -> bool:
    """Whether ``text`` nests arrays/objects deeper than MAX_DEPTH (cheap when it cannot): what
    to ask before json's C decoder sees untrusted text (:func:`loads`, JSON-RPC's ``parse``,
    webhook bodies)."""
    if isinstance(text, bytes):
        if text.count(b"[") + text.count(b"{") <= MAX_DEPTH:
            return False
        text = text.decode("utf-8", "replace")
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH


def long_digits(data: bytes) -> bool:
    """Whether ``data`` has 19 digits in a row: maybe an integer beyond 64 bits, which orjson
    would read as a float. (One ``translate`` and one substring search, in C: a regular
    expression's search took three to four times as long, two of them a play. ``find``, not
    ``in``: ``bytes.__contains__`` first tries its operand as an integer, and makes and clears
    a TypeError each time.)"""
    return data.translate(_DIGITS_AS_ZERO).find(_LONG_RUN) != -1


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON text, UTF-8 encoded (what orjson refuses: the standard library's,
    non-ASCII escaped)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """The value of JSON text (UTF-8 if bytes); ValueError if it is not JSON, or nests deeper
    than :data:`MAX_DEPTH` (json's C decoder recurses once a level, up to a recursion limit that
    a library may have raised past what the C stack holds)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if too_deep(raw):
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    if not long_digits(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # not JSON, or JSON orjson refuses (a lone surrogate, NaN): the standard library decides
    return json.loads(data if isinstance(data, str) else raw.decode("utf-8"))
