"""The tiny engine's functions (``print``, ``len``, ``push``, ...), each called with the evaluator
and the position of the call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from circles.worker.tiny_engine.values import ARRAY_BYTES, ITEM_BYTES, UNIT, check_int, error, type_name


def accepts(function, count: int) -> bool:
    code = function.__code__
    required = code.co_argcount - 2 - len(function.__defaults__ or ())
    return required <= count <= code.co_argcount - 2


def _wrong(name: str, pos: tuple, *args):
    raise error(pos, f"function not found: {name}({', '.join(type_name(arg) for arg in args)})")


def _print(ev, pos, value):
    ev.show(value, pos)
    return UNIT


def _debug_print(ev, pos, value):
    ev.show(value, pos, debug=True)
    return UNIT


def _len(ev, pos, value):
    if isinstance(value, (str, list, dict)):
        return len(value)
    return _wrong("len", pos, value)


def _is_empty(ev, pos, value):
    return _len(ev, pos, value) == 0


def _push(ev, pos, array, item):
    if not isinstance(array, list):
        return _wrong("push", pos, array, item)
    ev.allocate(pos, ITEM_BYTES)
    array.append(ev.copy(item, pos))
    return UNIT


def _pop(ev, pos, array):
    if not isinstance(array, list):
        return _wrong("pop", pos, array)
    return array.pop() if array else UNIT


def _contains(ev, pos, container, item):
    return ev.contains(container, item, pos)


def _keys(ev, pos, value):
    if not isinstance(value, dict):
        return _wrong("keys", pos, value)
    return ev.sorted_keys(value, pos)


def _values(ev, pos, value):
    if not isinstance(value, dict):
        return _wrong("values", pos, value)
    keys = ev.sorted_keys(value, pos)
    ev.allocate(pos, ARRAY_BYTES + len(keys) * ITEM_BYTES)
    return [ev.copy(value[key], pos) for key in keys]


def _to_string(ev, pos, value):
    return ev.text_of(value, pos)


def _to_int(ev, pos, value):
    if type(value) is int:
        return value
    if type(value) is float:
        return check_int(int(value), pos)
    return _wrong("to_int", pos, value)


def _to_float(ev, pos, value):
    if type(value) in (int, float):
        return float(value)
    return _wrong("to_float", pos, value)


def _abs(ev, pos, value):
    if type(value) is int:
        return check_int(abs(value), pos)
    if type(value) is float:
        return abs(value)
    return _wrong("abs", pos, value)


def _to_upper(ev, pos, value):
    if not isinstance(value, str):
        return _wrong("to_upper", pos, value)
    return ev.converted(value, str.upper, pos)


def _to_lower(ev, pos, value):
    if not isinstance(value, str):
        return _wrong("to_lower", pos, value)
    return ev.converted(value, str.lower, pos)


def _type_of(ev, pos, value):
    return type_name(value)


def _range(ev, pos, start, end, step=1):
    if type(start) is not int or type(end) is not int or type(step) is not int:
        return _wrong("range", pos, start, end, step)
    if step == 0:
        raise error(pos, "range step cannot be zero")
    return range(start, end, step)


BUILTINS: dict[str, Callable[..., Any]] = {"print": _print, "debug": _debug_print, "len": _len, "is_empty": _is_empty, "push": _push,
            "pop": _pop, "contains": _contains, "keys": _keys, "values": _values, "to_string": _to_string,
            "to_int": _to_int, "to_float": _to_float, "abs": _abs, "to_upper": _to_upper,
            "to_lower": _to_lower, "type_of": _type_of, "range": _range}
MUTATING = {"push", "pop"}
