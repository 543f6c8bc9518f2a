"""The tiny engine's values: its limits and budgets, Rhai's ``()``, its errors, the sizes a value
is charged, and a value's text (see :mod:`circles.worker.tiny_engine` for what they mean)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any

from circles.worker.engine_api import EngineError, OutputTooLarge

MAX_SCRIPT = 64 * 1024
MAX_STEPS = 100_000
MAX_STRING = 64 * 1024
MAX_DEPTH = 64  # nesting of expressions and blocks (Rhai's max_expr_depth)
MAX_CALL_DEPTH = 32
INT_MIN, INT_MAX = -(2 ** 63), 2 ** 63 - 1
CHARS_PER_STEP = 64  # n characters built, copied, compared or converted cost n / 64 steps
ITEMS_PER_STEP = 16  # n array or map items built, copied, visited or sorted cost n / 16 steps
TICKS_PER_STEP = 64  # the unit of the count: a character is 1 tick, an item 4, a step 64
CHAR_TICKS = TICKS_PER_STEP // CHARS_PER_STEP
ITEM_TICKS = TICKS_PER_STEP // ITEMS_PER_STEP
TEXT_ITEMS = 3  # a value put into text costs 3 items: it takes about 3 times as long as comparing it
LEVEL_ITEMS = 4  # entering an array or map in a walk (equality, text) costs 4 items more
#: The memory budget when the context gives none (``--max-script-memory`` sets another). 64 MiB:
#: a worker runs one tiny-engine script at a time, so this is about all a play can add to the
#: worker's own 30 to 60 MB, which a small machine affords; and it is more than the try-out's
#: scripts need: the step limit alone lets a script account about 5 MiB for its steps, 25 MiB
#: copying arrays, 150 MiB copying maps, so the budget bites only on scripts that copy big
#: values over and over, which are refused here rather than by the machine.
DEFAULT_MAX_MEMORY = 64 * 1024 * 1024
# Bytes charged (CPython 3.11's sizes on 64 bits, rounded up; see the package's docstring).
ASCII_BYTES = 56  # an ASCII str's header (49), rounded up as the allocator does
STRING_BYTES = 80  # any other str's header (74 to 80)
ARRAY_BYTES = 72  # a list's header and GC head
ITEM_BYTES = 16  # a list's slot (8), with room for the over-allocation of a growing list
MAP_BYTES = 240  # a dict's header and first table
MAP_ITEM_BYTES = 96  # a dict entry and its share of the hash table, after growth
STEP_BYTES = 48  # what one step may make and leave behind: an int (up to 36), a float, a range
LEVEL_BYTES = 256  # one level of a walk over a nested value (a generator or iterator)


class _Unit:
    """Rhai's ``()``: the value of a statement that has none (``let``, ``print``), shown as nothing."""

    def __repr__(self) -> str:
        return "()"


UNIT = _Unit()


def error(pos: tuple, message: str) -> EngineError:
    return EngineError(f"line {pos[0]}, column {pos[1]}: {message}")


def too_long(pos: tuple, max_steps: int) -> EngineError:
    # The script's length is not the matter (a one-line ``loop {}`` meets it): the work it did.
    return error(pos, f"step limit reached: more than {max_steps} steps (a loop that never ends?)")


def out_of_memory(pos: tuple, budget: int) -> EngineError:
    return error(pos, f"script memory limit exceeded ({budget} bytes)")


def check_int(value: int, pos: tuple) -> int:
    if not INT_MIN <= value <= INT_MAX:
        raise error(pos, "integer overflow (Rhai integers are 64-bit)")
    return value


def check_string(value: str, pos: tuple) -> str:
    if len(value) > MAX_STRING:
        raise error(pos, f"string longer than {MAX_STRING} characters")
    return value


def type_name(value: Any) -> str:
    """Rhai's ``type_of``."""
    if value is UNIT:
        return "()"
    return {bool: "bool", int: "i64", float: "f64", str: "string", list: "array", dict: "map",
            range: "range"}[type(value)]


def float_text(value: float) -> str:
    """A float as Rhai shows it: ``3.0``, ``0.5``; exponent form outside 1e-13..1e13. From the
    digits of ``repr`` (the shortest that read back the same, as Rhai prints), rearranged."""
    if value == 0:
        return "0.0" if math.copysign(1, value) > 0 else "-0.0"
    text = repr(value)
    size = abs(value)
    if 1e-4 <= size < 1e13:
        return text  # repr is positional here, as Rhai is
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = text.lstrip("-").partition("e")
    whole, _, fraction = mantissa.partition(".")
    power = int(exponent or 0) + len(whole) - 1
    digits = (whole + fraction).rstrip("0")
    if size >= 1e13 or size < 1e-13:
        return f"{sign}{digits[0]}{'.' + digits[1:] if len(digits) > 1 else ''}e{power}"
    return f"{sign}0.{'0' * (-power - 1)}{digits}"


def string_bytes(length: int, ascii: bool) -> int:
    """What a string of ``length`` characters is charged: CPython keeps 1 byte a character for
    ASCII, up to 4 otherwise."""
    return ASCII_BYTES + length if ascii else STRING_BYTES + 4 * length


def utf8_size(text: str) -> int:
    """UTF-8 bytes of ``text`` (as the output cap counts them)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _scalar_text(value: Any) -> str:
    """The text of a value that is not a string, array or map (the same for print and debug)."""
    if type(value) is int:
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return float_text(value)
    if isinstance(value, range):
        if value.step != 1:
            return f"range({value.start}, {value.stop}, {value.step})"
        return f"{value.start}..{value.stop}"
    if value is UNIT:
        return "()"
    return str(value)


def _quoted(value: str) -> str:
    """A string as ``debug`` shows it, quoted and escaped: at most ``2 * len(value) + 2`` characters."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace(
        "\t", "\\t").replace("\r", "\\r") + '"'


class Text:
    """A string built from pieces, each one paid for (steps, memory) and checked against the
    limit before it is added: text that would pass the limit stops at the first piece over it
    and is never built. (An array holding 2^13 references to one 64 KiB string is cheap to hold,
    but its text is 512 MiB.) The limit is ``max_chars`` characters, or, for a line of output,
    ``max_bytes`` UTF-8 bytes (the room left under the output cap). ``ev`` is the evaluator that
    pays for it (:class:`circles.worker.tiny_engine.evaluator.Evaluator`)."""

    __slots__ = ("ev", "pos", "pieces", "chars", "bytes", "width", "max_chars", "max_bytes")

    def __init__(self, ev: Any, pos: tuple, max_chars: int | None = MAX_STRING,
                 max_bytes: int | None = None) -> None:
        self.ev = ev
        self.pos = pos
        self.pieces: list = []
        self.chars = 0
        self.bytes = 0
        self.width = 1  # bytes a character of the result takes: 1 while it is ASCII, then 4
        self.max_chars = max_chars
        self.max_bytes = max_bytes

    def refuse_past(self, chars: int) -> None:
        """Refuse now if adding ``chars`` more characters (at least as many bytes) passes the limit."""
        if self.max_chars is not None and self.chars + chars > self.max_chars:
            raise error(self.pos, f"string longer than {MAX_STRING} characters")
        if self.max_bytes is not None and self.bytes + chars > self.max_bytes:
            raise OutputTooLarge(self.ev.max_output)

    def add(self, piece: str, new: bool = False) -> None:
        """Add ``piece``; ``new`` when it was made for this text (not a value the script holds).
        (The evaluator's ``work`` and ``allocate``, inlined: this is the walk's inner loop.)"""
        n = len(piece)
        ev = self.ev
        ticks = ev.ticks + n * CHAR_TICKS
        if ticks > ev.max_ticks:
            raise too_long(self.pos, ev.max_steps)
        ev.ticks = ticks
        if self.max_chars is not None and self.chars + n > self.max_chars:
            raise error(self.pos, f"string longer than {MAX_STRING} characters")
        ascii = piece.isascii()
        if self.max_bytes is not None:
            size = n if ascii else utf8_size(piece)
            if self.bytes + size > self.max_bytes:
                raise OutputTooLarge(ev.max_output)
            self.bytes += size
        if ascii:
            cost = ITEM_BYTES + n * self.width  # its slot, its characters in the result
            if new:
                cost += ASCII_BYTES + n
        else:
            cost = ITEM_BYTES + 4 * n + self.chars * (4 - self.width)  # all of the result is wider now
            self.width = 4
            if new:
                cost += STRING_BYTES + 4 * n
        memory = ev.memory + cost
        if memory > ev.max_memory:
            raise out_of_memory(self.pos, ev.max_memory)
        ev.memory = memory
        self.chars += n
        self.pieces.append(piece)

    def add_quoted(self, value: str, before: str = "") -> None:
        """Add ``before`` and ``value`` quoted and escaped, as ``debug`` shows it."""
        self.refuse_past(len(before) + len(value) + 2)  # escaping only makes it longer
        self.ev.work(self.pos, chars=len(value))
        self.add(before + _quoted(value), new=True)

    def add_value(self, value: Any, debug: bool = False) -> None:
        """Add ``value``'s text: ``to_string``'s (a string as it is, ``()`` as nothing) or, with
        ``debug``, ``to_debug``'s. Arrays and maps are walked with a stack of iterators, not by
        recursion; each value put into text costs ``TEXT_ITEMS`` items (it takes about that much
        longer than comparing it), and its characters."""
        if not debug:
            if type(value) is str:
                self.add(value)
                return
            if value is UNIT:
                return
        ev, pos = self.ev, self.pos
        levels: list = []  # (iterator of (text before, value), text after) for each open level
        deepest = 0  # levels paid for: the walk holds at most that many at once
        before, item = "", value
        while True:
            ev.work(pos, items=TEXT_ITEMS)
            kind = type(item)
            if kind is list or kind is dict:
                ev.work(pos, items=LEVEL_ITEMS)
                if len(levels) == deepest:
                    ev.allocate(pos, LEVEL_BYTES)
                    deepest += 1
                if kind is list:
                    self.add(before + "[", new=True)
                    levels.append((zip(chain(("",), repeat(", ")), item), "]"))
                else:
                    self.add(before + "#{", new=True)
                    levels.append((self.map_items(item), "}"))
            elif kind is str:
                self.add_quoted(item, before)
            else:
                self.add(before + _scalar_text(item), new=True)
            while levels:
                pair = next(levels[-1][0], None)
                if pair is not None:
                    before, item = pair
                    break
                self.add(levels.pop()[1])
            else:
                return

    def map_items(self, value: dict) -> Iterator:
        """A map's items in key order, each with the text before it: ``, "key": ``."""
        for i, key in enumerate(self.ev.sorted_keys(value, self.pos)):
            self.refuse_past(len(key) + 6)
            self.ev.work(self.pos, chars=len(key))
            yield (", " if i else "") + _quoted(key) + ": ", value[key]

    def text(self) -> str:
        return "".join(self.pieces)  # paid for piece by piece


@dataclass
class Stats:
    """What a run used, for tests and measurements: ``run(script, context, stats=Stats())``
    fills it in, also when the script is refused."""

    steps: int = 0  # steps charged (rounded up from ticks)
    memory: int = 0  # bytes accounted: a running total, so also the peak
    max_steps: int = MAX_STEPS
    max_memory: int = DEFAULT_MAX_MEMORY
