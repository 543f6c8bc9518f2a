"""JSON between circles' own processes: a worker's replies to the server, the frames between a
worker and its engine children. orjson (C, a tenth of the standard library's time on these small
objects, three to five of them a play) wherever it gives what ``json`` gives; ``json`` where it
would not: text orjson refuses (a lone surrogate escaped, NaN), integers beyond 64 bits (orjson
reads them as floats and refuses to write them). Either way the same values come out.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

#: 19 digits in a row may be an integer beyond 64 bits, which orjson would read as a float.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def dumps(value: Any) -> bytes:
    """``value`` as compact JSON text, UTF-8 encoded (what orjson refuses: the standard library's,
    non-ASCII escaped)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """The value of JSON text (UTF-8 if bytes); ValueError if it is not JSON."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if _LONG_DIGITS.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # not JSON, or JSON orjson refuses (a lone surrogate, NaN): the standard library decides
    return json.loads(data if isinstance(data, str) else bytes(data).decode("utf-8"))
