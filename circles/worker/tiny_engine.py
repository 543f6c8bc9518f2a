"""A tiny subset of Rhai, run in the worker's process: the try-out's engine.

    let x = 6 * 7;              // comments, as in Rhai
    print(`hello ${CALLER_ID}`);
    x

Why not ``sh`` for the try-out: ``--auth`` proves who a caller is, not that they may run code,
and any key can sign a nonce; WebSockets ignore the same-origin policy, so any web page open in
the user's browser could reach a try-out on localhost and run shell commands as the user. This
engine has no I/O at all. ``rhai-run`` replaces it in earnest:
``circles-worker --exec 'rhai-run {script_file}'``.

It is its own tokenizer, recursive-descent parser and evaluator of a Rhai subset; what it
accepts means what it means in Rhai, anything else is refused with ``line L, column C: ...``:

- comments ``//`` and ``/* */`` (nested, as in Rhai); statements separated by ``;``;
- ``let`` / ``const`` (constants cannot be changed), ``=`` and ``+=``-style assignment to a
  variable, an array element or a map field;
- ``if``/``else`` (statement and expression), ``while``, ``loop``, ``break``, ``continue``,
  ``for x in ...`` over ``range(a, b[, step])``, ``a..b``, ``a..=b``, arrays, strings and maps
  (``for (x, i) in ...`` gives the index too), ``{ }`` blocks (with their own scope);
- ``fn name(a, b) { ... }`` at the top level, ``return``; as in Rhai a function sees only its
  parameters (no outer variables, not even ``CONTEXT_ID``);
- integers (Rhai's ``i64``: overflow is an error, ``/`` truncates, ``%`` has the sign of the
  dividend), floats, strings (``"..."`` with escapes, and backtick strings with ``${expr}``
  interpolation), ``true``/``false``, arrays ``[1, 2]`` and object maps ``#{a: 1, "b": 2}``
  (indexing ``a[0]``, ``a[-1]``, ``m["a"]``, ``m.a``; a missing field is ``()``);
- the operators of Rhai with its precedence (``5 > 3 == true`` is ``true``: no chained
  comparisons); values of different types compare unequal (``==`` false, ``!=`` true, ``<``
  false); ``&&``/``||`` take booleans only; ``in``; ``??``;
- functions (also as methods, ``a.len()``): ``print``, ``debug``, ``len``, ``is_empty``,
  ``push``, ``pop``, ``contains``, ``keys``, ``values``, ``to_string``, ``to_int``,
  ``to_float``, ``type_of``, ``abs``, ``to_upper``, ``to_lower``, ``range``;
- ``CONTEXT_ID`` (the circle) and ``CALLER_ID`` (the caller) are constants, as under the
  ecosystem's Rhai workers; so are ``CIRCLES_SOURCE`` and ``CIRCLES_TASK_ID``, and for a
  webhook event ``CIRCLES_DATA``, its JSON text (docs/webhooks.md: the default scripts call
  ``on_stripe_event(CIRCLES_DATA)``), charged against the memory budget like any string.

Not there (refused): characters (``'a'``), closures, ``switch``, ``do``, ``try``/``throw``,
modules, string indexing, and the rest of Rhai's standard library.

The output is what ``print`` printed (one line per call) followed by the value of the last
statement when it has one. Values are Python ``int``/``float``/``str``/``bool``/``list``/
``dict``/``range`` held by the evaluator; a script can name nothing else.

Limits. The engine runs in the worker's reactor, so a script's cost must be bounded by what it
does, not by how many statements it has: all work is paid for *before* it is done, and every
value *as* it is built, never after.

- Work is counted in steps (``MAX_STEPS``): one per statement, expression and loop turn, plus
  one per ``CHARS_PER_STEP`` characters and one per ``ITEMS_PER_STEP`` items an operation
  builds, copies, compares, searches, sorts or turns into text (a value turned into text counts
  as ``TEXT_ITEMS`` items, an array or map entered by a walk ``LEVEL_ITEMS`` more: they take
  that much longer). Counted in ticks, ``TICKS_PER_STEP`` to a
  step, so that small pieces of work add up instead of rounding to nothing. The most expensive
  step measured takes about 6 microseconds, so no script runs much longer than half a second.
- Memory is a running total of what the script allocates, against ``max_memory`` bytes (the
  context's, or ``DEFAULT_MAX_MEMORY``): every string, array, map, copy, sort and piece of text
  adds its size as it is made, and nothing is taken off when it is dropped, so the total bounds
  what the script holds at any time (it overstates it: sound and simple). Sizes are CPython's,
  rounded up: a string ``ASCII_BYTES`` plus a byte a character if ASCII, else ``STRING_BYTES``
  plus 4 bytes a character; an array ``ARRAY_BYTES`` plus ``ITEM_BYTES`` an item; a map
  ``MAP_BYTES`` plus ``MAP_ITEM_BYTES`` an item; ``STEP_BYTES`` a step (the number, range or
  scope it may make); ``LEVEL_BYTES`` a level of a walk. A value held many times is paid for
  once: an array of 2^13 references to one 64 KiB string costs 2^13 items, not 512 MiB.
- Text (``to_string``, ``print``, ``debug``, ``${...}``, a string plus another value, the final
  value) is built piece by piece, each piece paid for and checked against the result's limit
  (``MAX_STRING`` characters, or the room left under the output cap) *before* it is added: the
  text of that array is refused at its first piece over the limit, never built.
- Equality, ``in``, copies and text walk values with a stack, not recursion (values may nest
  deeper than Python's recursion limit); the script's own nesting (expressions, blocks, index
  and method chains: ``MAX_DEPTH``) and calls (``MAX_CALL_DEPTH``) are bounded.

A refusal is an EngineError: ``line L, column C: step limit reached: more than 100000 steps (a
loop that never ends?)``,
``line L, column C: script memory limit exceeded (67108864 bytes)``, ``line L, column C: string
longer than 65536 characters``, or OutputTooLarge. Python allocates no more than the budget plus
a constant: the tokens and parse tree of the script (about 15 MiB at most, for ``MAX_SCRIPT``
characters), and a piece of at most ``3 * MAX_STRING`` characters being checked. ``run(..., stats=Stats())`` records what was used.

Audit of every operator and builtin for work that grows with its operands (and what pays for
it): ``==``, ``!=``, ``in``, ``contains``: items visited, characters compared (keys too);
``<``, ``<=``, ``>``, ``>=`` on strings: characters; string ``+``, ``${}``, ``to_string``,
``print``, ``debug``: characters built, values visited; array ``+``, array and map literals,
every copy (``let``, assignment, ``push``, arguments, loop variables, a changed temporary):
items; ``keys``, ``values``, a map's text: the sort, n log n items and the keys' characters;
``to_upper``, ``to_lower``: characters; a string key (``m[k]``, ``k in m``): its characters (the
hash); ``for`` over an array: a shallow copy, then a step a turn (ranges are never
materialised, whatever their length). Constant: ``len``, ``is_empty``, ``pop``, ``type_of``,
``to_int``, ``to_float``, ``abs``, ``range``, ``..``, indexing, properties, and arithmetic
(integers are 64-bit: ``**`` and shifts are refused before they could grow). Tokenizing and
parsing are linear in the script, at most ``MAX_SCRIPT`` characters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Callable, Iterator, Optional

from circles.worker.engines import DEFAULT_MAX_OUTPUT, EngineError, OutputTooLarge, ScriptContext, output_of_lines

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
# Bytes charged (CPython 3.11's sizes on 64 bits, rounded up; see the module's docstring).
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

KEYWORDS = {"let", "const", "if", "else", "while", "loop", "for", "in", "break", "continue", "return",
            "fn", "true", "false"}
#: Rhai keywords (and reserved words) this engine does not implement: refused by name.
UNSUPPORTED = {"switch", "do", "until", "throw", "try", "catch", "import", "export", "as", "private",
               "global", "this", "Fn", "call", "curry", "eval", "is_def_var", "is_def_fn", "static",
               "shared", "sync", "async", "await", "yield", "var", "goto", "exit", "new", "use",
               "with", "module", "package", "super", "match", "case", "public", "protected", "spawn",
               "thread", "go", "default", "void", "null", "nil"}
SYMBOLS = sorted(["+", "-", "*", "/", "%", "**", "==", "!=", "<", "<=", ">", ">=", "&&", "||", "!", "&",
                  "|", "^", "<<", ">>", "=", "+=", "-=", "*=", "/=", "%=", "**=", "<<=", ">>=", "&=",
                  "|=", "^=", "(", ")", "{", "}", "[", "]", "#{", ",", ";", ":", ".", "..", "..=",
                  "??"], key=len, reverse=True)
#: Binary operators: precedence (higher binds tighter), as in Rhai's table; ``**`` is right-associative.
BINARY = {"||": 30, "|": 30, "^": 30, "&&": 60, "&": 60, "==": 90, "!=": 90, "in": 110, "<": 130,
          "<=": 130, ">": 130, ">=": 130, "??": 135, "..": 140, "..=": 140, "+": 150, "-": 150,
          "*": 180, "/": 180, "%": 180, "**": 190, "<<": 210, ">>": 210}
ASSIGNMENTS = {"=", "+=", "-=", "*=", "/=", "%=", "**=", "<<=", ">>=", "&=", "|=", "^="}
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def _error(pos: tuple, message: str) -> EngineError:
    return EngineError(f"line {pos[0]}, column {pos[1]}: {message}")


def _too_long(pos: tuple) -> EngineError:
    # The script's length is not the matter (a one-line ``loop {}`` meets it): the work it did.
    return _error(pos, f"step limit reached: more than {MAX_STEPS} steps (a loop that never ends?)")


def _out_of_memory(pos: tuple, budget: int) -> EngineError:
    return _error(pos, f"script memory limit exceeded ({budget} bytes)")


# --- tokens: (kind, value, (line, column)); kinds: int float str tmpl name kw op eof ---

class _Tokenizer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.line = 1
        self.line_start = 0

    def pos(self) -> tuple:
        return (self.line, self.i - self.line_start + 1)

    def advance(self, n: int = 1) -> None:
        for _ in range(n):
            if self.text[self.i] == "\n":
                self.line += 1
                self.line_start = self.i + 1
            self.i += 1

    def tokens(self, until_brace: bool = False) -> list:
        """All tokens to the end, or (``until_brace``) to the ``}`` closing a ``${``."""
        out: list = []
        depth = 0
        text = self.text
        while True:
            self.skip_space()
            pos = self.pos()
            if self.i >= len(text):
                if until_brace:
                    raise _error(pos, "unterminated ${ in a string")
                out.append(("eof", None, pos))
                return out
            c = text[self.i]
            if until_brace and c == "}" and depth == 0:
                self.advance()
                out.append(("eof", None, pos))
                return out
            if c.isdigit():
                out.append(self.number(pos))
            elif c.isalpha() or c == "_":
                j = self.i
                while j < len(text) and (text[j].isalnum() or text[j] == "_") and text[j].isascii():
                    j += 1
                word = text[self.i:j]
                if not word.isascii() or not word.isidentifier():
                    raise _error(pos, f"unexpected character {text[self.i]!r}")
                self.advance(j - self.i)
                if word in UNSUPPORTED:
                    raise _error(pos, f"'{word}' is not supported by this engine")
                out.append(("kw" if word in KEYWORDS else "name", word, pos))
            elif c == '"':
                out.append(("str", self.string(pos), pos))
            elif c == "`":
                out.append(("tmpl", self.template(pos), pos))
            elif c == "'":
                raise _error(pos, "character literals are not supported by this engine (use a string)")
            else:
                for symbol in SYMBOLS:
                    if text.startswith(symbol, self.i):
                        break
                else:
                    raise _error(pos, f"unexpected character {c!r}")
                if symbol in ("{", "#{"):
                    depth += 1
                elif symbol == "}":
                    depth -= 1
                self.advance(len(symbol))
                out.append(("op", symbol, pos))

    def skip_space(self) -> None:
        text = self.text
        while self.i < len(text):
            c = text[self.i]
            if c.isspace():
                self.advance()
            elif text.startswith("//", self.i):
                while self.i < len(text) and text[self.i] != "\n":
                    self.advance()
            elif text.startswith("/*", self.i):
                pos, nesting = self.pos(), 0
                while True:
                    if self.i >= len(text):
                        raise _error(pos, "unterminated comment")
                    if text.startswith("/*", self.i):
                        nesting += 1
                        self.advance(2)
                    elif text.startswith("*/", self.i):
                        nesting -= 1
                        self.advance(2)
                        if nesting == 0:
                            break
                    else:
                        self.advance()
            else:
                return

    def number(self, pos: tuple) -> tuple:
        text = self.text
        j = self.i
        if text.startswith(("0x", "0o", "0b"), j):
            base = {"x": 16, "o": 8, "b": 2}[text[j + 1]]
            j += 2
            while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                j += 1
            digits = text[self.i + 2:j].replace("_", "")
            value: float  # int or float
            try:
                value = int(digits, base)
            except ValueError:
                raise _error(pos, f"invalid number {text[self.i:j]!r}") from None
            kind = "int"
        else:
            while j < len(text) and (text[j].isdigit() or text[j] == "_"):
                j += 1
            kind = "int"
            if j + 1 < len(text) and text[j] == "." and text[j + 1].isdigit():
                kind = "float"
                j += 1
                while j < len(text) and (text[j].isdigit() or text[j] == "_"):
                    j += 1
            if j < len(text) and text[j] in "eE":
                k = j + 1
                if k < len(text) and text[k] in "+-":
                    k += 1
                if k < len(text) and text[k].isdigit():
                    kind = "float"
                    j = k
                    while j < len(text) and text[j].isdigit():
                        j += 1
            if j < len(text) and (text[j].isalpha() or text[j] == "_"):
                raise _error(pos, f"invalid number {text[self.i:j + 1]!r}")
            digits = text[self.i:j].replace("_", "")
            try:
                value = int(digits) if kind == "int" else float(digits)
            except ValueError:
                raise _error(pos, f"invalid number {text[self.i:j]!r}") from None
            if kind == "float" and not math.isfinite(value):
                raise _error(pos, f"number out of range: {text[self.i:j]}")
        if kind == "int" and value > INT_MAX:
            raise _error(pos, f"integer out of range: {text[self.i:j]}")
        self.advance(j - self.i)
        return (kind, value, pos)

    def string(self, pos: tuple) -> str:
        text = self.text
        self.advance()  # the opening quote
        parts: list[str] = []
        while True:
            if self.i >= len(text) or text[self.i] == "\n":
                raise _error(pos, "unterminated string")
            c = text[self.i]
            if c == '"':
                self.advance()
                return _check_string("".join(parts), pos)
            if c == "\\":
                escape_pos = self.pos()
                nxt = text[self.i + 1:self.i + 2]
                if nxt in ESCAPES:
                    parts.append(ESCAPES[nxt])
                    self.advance(2)
                elif nxt == "\n":  # a backslash at the end of a line continues the string
                    self.advance(2)
                    while self.i < len(text) and text[self.i] in " \t":
                        self.advance()
                elif nxt in ("x", "u", "U"):
                    size = {"x": 2, "u": 4, "U": 8}[nxt]
                    digits = text[self.i + 2:self.i + 2 + size]
                    try:
                        if len(digits) != size:
                            raise ValueError
                        parts.append(chr(int(digits, 16)))
                    except ValueError:
                        raise _error(escape_pos, f"invalid escape \\{nxt}{digits}") from None
                    self.advance(2 + size)
                else:
                    raise _error(escape_pos, f"invalid escape \\{nxt}")
            else:
                parts.append(c)
                self.advance()

    def template(self, pos: tuple) -> list:
        """A backtick string: a list of text pieces and token lists (the ``${...}`` parts)."""
        text = self.text
        self.advance()
        parts: list = []
        piece: list = []
        while True:
            if self.i >= len(text):
                raise _error(pos, "unterminated string")
            c = text[self.i]
            if c == "`":
                if text.startswith("``", self.i):  # a doubled backtick is one backtick
                    piece.append("`")
                    self.advance(2)
                    continue
                self.advance()
                parts.append(_check_string("".join(piece), pos))
                return parts
            if text.startswith("${", self.i):
                parts.append(_check_string("".join(piece), pos))
                piece = []
                self.advance(2)
                parts.append(self.tokens(until_brace=True))
            else:
                piece.append(c)
                self.advance()


# --- the parser: nodes are tuples (kind, pos, ...) ---

class _Parser:
    def __init__(self, tokens: list, functions: dict, depth: int = 0) -> None:
        self.tokens = tokens
        self.k = 0
        self.functions = functions
        self.depth = depth

    @property
    def token(self) -> tuple:
        return self.tokens[self.k]

    def take(self) -> tuple:
        token = self.tokens[self.k]
        if token[0] != "eof":
            self.k += 1
        return token

    def at(self, value: str) -> bool:
        kind, v, _ = self.token
        return kind in ("op", "kw") and v == value

    def expect(self, value: str) -> tuple:
        if not self.at(value):
            raise self.unexpected(f"expected '{value}'")
        return self.take()

    def unexpected(self, hint: str = "") -> EngineError:
        kind, value, pos = self.token
        what = "end of script" if kind == "eof" else repr(value) if kind != "tmpl" else "a string"
        return _error(pos, f"unexpected {what}" + (f" ({hint})" if hint else ""))

    def nest(self, pos: tuple) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(pos, "expression nested too deeply")

    def script(self, top_level: bool = True) -> tuple:
        statements = self.statements(top_level)
        if self.token[0] != "eof":
            raise self.unexpected()
        return ("block", (1, 1), statements)

    def statements(self, top_level: bool = False) -> list:
        out = []
        while self.token[0] != "eof" and not self.at("}"):
            if self.at(";"):
                self.take()
                continue
            if self.at("fn"):
                if not top_level:
                    raise _error(self.token[2], "functions can only be defined at the top level")
                self.function()
                continue
            statement, needs_semicolon = self.statement()
            out.append(statement)
            if self.at(";"):
                self.take()
            elif needs_semicolon and self.token[0] != "eof" and not self.at("}"):
                raise self.unexpected("expected ';'")
        return out

    def function(self) -> None:
        pos = self.take()[2]
        kind, name, name_pos = self.take()
        if kind != "name":
            raise _error(name_pos, "expected a function name")
        self.expect("(")
        params: list = []
        while not self.at(")"):
            kind, param, param_pos = self.take()
            if kind != "name":
                raise _error(param_pos, "expected a parameter name")
            if param in params:
                raise _error(param_pos, f"duplicate parameter: {param}")
            params.append(param)
            if not self.at(")"):
                self.expect(",")
        self.take()
        if (name, len(params)) in self.functions:
            raise _error(name_pos, f"function {name} with {len(params)} parameters is defined twice")
        self.functions[(name, len(params))] = ("fn", pos, name, params, self.block())

    def block(self) -> tuple:
        pos = self.expect("{")[2]
        self.nest(pos)
        statements = self.statements()
        self.expect("}")
        self.depth -= 1
        return ("block", pos, statements)

    def statement(self) -> tuple:
        """One statement, and whether a ``;`` must follow it."""
        kind, value, pos = self.token
        if kind == "kw" and value in ("let", "const"):
            self.take()
            name_kind, name, name_pos = self.take()
            if name_kind != "name":
                raise _error(name_pos, f"expected a variable name after '{value}'")
            init = None
            if self.at("="):
                self.take()
                init = self.expression()
            elif value == "const":
                raise self.unexpected("a constant needs a value")
            return ("let", pos, name, init, value == "const"), True
        if kind == "kw" and value == "while":
            self.take()
            condition = self.expression()
            return ("while", pos, condition, self.block()), False
        if kind == "kw" and value == "loop":
            self.take()
            return ("while", pos, None, self.block()), False
        if kind == "kw" and value == "for":
            self.take()
            index = None
            if self.at("("):
                self.take()
                name = self.name()
                self.expect(",")
                index = self.name()
                self.expect(")")
            else:
                name = self.name()
            self.expect("in")
            iterable = self.expression()
            return ("for", pos, name, index, iterable, self.block()), False
        if kind == "kw" and value in ("break", "continue"):
            self.take()
            return (value, pos), True
        if kind == "kw" and value == "return":
            self.take()
            result = None if self.at(";") or self.at("}") or self.token[0] == "eof" else self.expression()
            return ("return", pos, result), True
        if kind == "op" and value == "{":
            return self.block(), False
        if kind == "kw" and value == "if":
            node = self.if_()
            return node, False
        target = self.expression()
        if self.token[0] == "op" and self.token[1] in ASSIGNMENTS:
            op_kind, op, op_pos = self.take()
            if target[0] not in ("var", "index", "field"):
                raise _error(op_pos, "cannot assign to this expression")
            return ("assign", op_pos, target, op, self.expression()), True
        return target, True

    def name(self) -> str:
        kind, value, pos = self.take()
        if kind != "name":
            raise _error(pos, "expected a variable name")
        return value

    def if_(self) -> tuple:
        pos = self.expect("if")[2]
        condition = self.expression()
        then = self.block()
        otherwise = None
        if self.at("else"):
            self.take()
            otherwise = self.if_() if self.at("if") else self.block()
        return ("if", pos, condition, then, otherwise)

    def expression(self, min_precedence: int = 0) -> tuple:
        pos = self.token[2]
        self.nest(pos)
        left = self.unary()
        while True:
            kind, op, op_pos = self.token
            if kind not in ("op", "kw") or op not in BINARY or BINARY[op] <= min_precedence:
                break
            self.take()
            precedence = BINARY[op]
            right = self.expression(precedence - 1 if op == "**" else precedence)
            if op in ("&&", "||", "??"):
                left = (op, op_pos, left, right)
            else:
                left = ("binary", op_pos, op, left, right)
        self.depth -= 1
        return left

    def unary(self) -> tuple:
        kind, value, pos = self.token
        if kind == "op" and value in ("-", "+", "!"):
            self.take()
            self.nest(pos)
            operand = self.unary()
            self.depth -= 1
            if value == "-" and operand[0] == "lit" and type(operand[2]) is int:
                return ("lit", pos, _check_int(-operand[2], pos))
            if value == "-" and operand[0] == "lit" and type(operand[2]) is float:
                return ("lit", pos, -operand[2])  # -1e300 is a float, not an integer overflow
            return ("unary", pos, value, operand)
        return self.postfix(self.primary())

    def postfix(self, node: tuple) -> tuple:
        """Indexing, properties and method calls after ``node``: each one a level of nesting
        (``a[0][0]...`` is evaluated by recursion, as deep as it is long)."""
        levels = 0
        try:
            while True:
                kind, value, pos = self.token
                if kind != "op" or value not in ("[", "."):
                    return node
                self.nest(pos)
                levels += 1
                if value == "[":
                    self.take()
                    index = self.expression()
                    self.expect("]")
                    node = ("index", pos, node, index)
                else:
                    self.take()
                    name_kind, name, name_pos = self.take()
                    if name_kind != "name":
                        raise _error(name_pos, "expected a property or method name after '.'")
                    if self.at("("):
                        node = ("call", name_pos, name, [node] + self.arguments(), True)
                    else:
                        node = ("field", name_pos, node, name)
        finally:
            self.depth -= levels

    def arguments(self) -> list:
        self.expect("(")
        return self.expressions_until(")")

    def expressions_until(self, closing: str) -> list:
        """Comma-separated expressions up to ``closing`` (taken), a trailing comma allowed."""
        items = []
        while not self.at(closing):
            items.append(self.expression())
            if not self.at(closing):
                self.expect(",")
        self.take()
        return items

    def primary(self) -> tuple:
        kind, value, pos = self.token
        if kind in ("int", "float", "str"):
            self.take()
            return ("lit", pos, value)
        if kind == "tmpl":
            self.take()
            parts: list = []  # text, and ("block", pos, statements)
            for part in value:
                if isinstance(part, str):
                    parts.append(part)
                else:
                    parser = _Parser(part, self.functions, self.depth + 1)
                    inner = parser.statements()
                    if parser.token[0] != "eof":
                        raise parser.unexpected()
                    parts.append(("block", part[0][2], inner))
            return ("tmpl", pos, parts)
        if kind == "kw" and value in ("true", "false"):
            self.take()
            return ("lit", pos, value == "true")
        if kind == "kw" and value == "if":
            return self.if_()
        if kind == "name":
            self.take()
            if self.at("("):
                return ("call", pos, value, self.arguments(), False)
            return ("var", pos, value)
        if kind == "op" and value == "(":
            self.take()
            if self.at(")"):
                self.take()
                return ("lit", pos, UNIT)
            node = self.expression()
            self.expect(")")
            return node
        if kind == "op" and value == "[":
            self.take()
            return ("array", pos, self.expressions_until("]"))
        if kind == "op" and value == "#{":
            self.take()
            entries = []
            while not self.at("}"):
                key_kind, key, key_pos = self.take()
                if key_kind not in ("name", "str", "kw"):
                    raise _error(key_pos, "expected a property name")
                self.expect(":")
                entries.append((key, self.expression()))
                if not self.at("}"):
                    self.expect(",")
            self.take()
            return ("map", pos, entries)
        if kind == "op" and value == "{":
            return self.block()
        raise self.unexpected()


# --- values ---

def _check_int(value: int, pos: tuple) -> int:
    if not INT_MIN <= value <= INT_MAX:
        raise _error(pos, "integer overflow (Rhai integers are 64-bit)")
    return value


def _check_string(value: str, pos: tuple) -> str:
    if len(value) > MAX_STRING:
        raise _error(pos, f"string longer than {MAX_STRING} characters")
    return value


def type_name(value: Any) -> str:
    """Rhai's ``type_of``."""
    if value is UNIT:
        return "()"
    return {bool: "bool", int: "i64", float: "f64", str: "string", list: "array", dict: "map",
            range: "range"}[type(value)]


def _float_text(value: float) -> str:
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


def _string_bytes(length: int, ascii: bool) -> int:
    """What a string of ``length`` characters is charged: CPython keeps 1 byte a character for
    ASCII, up to 4 otherwise."""
    return ASCII_BYTES + length if ascii else STRING_BYTES + 4 * length


def _utf8_size(text: str) -> int:
    """UTF-8 bytes of ``text`` (as the output cap counts them)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _scalar_text(value: Any) -> str:
    """The text of a value that is not a string, array or map (the same for print and debug)."""
    if type(value) is int:
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float_text(value)
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


class _Text:
    """A string built from pieces, each one paid for (steps, memory) and checked against the
    limit before it is added: text that would pass the limit stops at the first piece over it
    and is never built. (An array holding 2^13 references to one 64 KiB string is cheap to hold,
    but its text is 512 MiB.) The limit is ``max_chars`` characters, or, for a line of output,
    ``max_bytes`` UTF-8 bytes (the room left under the output cap)."""

    __slots__ = ("ev", "pos", "pieces", "chars", "bytes", "width", "max_chars", "max_bytes")

    def __init__(self, ev: "_Evaluator", pos: tuple, max_chars: Optional[int] = MAX_STRING,
                 max_bytes: Optional[int] = None) -> None:
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
            raise _error(self.pos, f"string longer than {MAX_STRING} characters")
        if self.max_bytes is not None and self.bytes + chars > self.max_bytes:
            raise OutputTooLarge(self.ev.max_output)

    def add(self, piece: str, new: bool = False) -> None:
        """Add ``piece``; ``new`` when it was made for this text (not a value the script holds).
        (The evaluator's ``work`` and ``allocate``, inlined: this is the walk's inner loop.)"""
        n = len(piece)
        ev = self.ev
        ticks = ev.ticks + n * CHAR_TICKS
        if ticks > ev.max_ticks:
            raise _too_long(self.pos)
        ev.ticks = ticks
        if self.max_chars is not None and self.chars + n > self.max_chars:
            raise _error(self.pos, f"string longer than {MAX_STRING} characters")
        ascii = piece.isascii()
        if self.max_bytes is not None:
            size = n if ascii else _utf8_size(piece)
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
            raise _out_of_memory(self.pos, ev.max_memory)
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


class _Absent:
    """The value of a key one map has and the other has not: equal to nothing."""


_ABSENT = _Absent()


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class _Return(Exception):
    def __init__(self, value: Any) -> None:
        self.value = value


class _Variable:
    __slots__ = ("value", "constant")

    def __init__(self, value: Any, constant: bool) -> None:
        self.value = value
        self.constant = constant


@dataclass
class Stats:
    """What a run used, for tests and measurements: ``run(script, context, stats=Stats())``
    fills it in, also when the script is refused."""

    steps: int = 0  # steps charged (rounded up from ticks)
    memory: int = 0  # bytes accounted: a running total, so also the peak
    max_steps: int = MAX_STEPS
    max_memory: int = DEFAULT_MAX_MEMORY


class _Evaluator:
    def __init__(self, context: ScriptContext, functions: dict) -> None:
        self.functions = functions
        self.scopes: list = [{"CONTEXT_ID": _Variable(context.circle, True),
                              "CALLER_ID": _Variable(context.caller, True),
                              "CIRCLES_SOURCE": _Variable(context.source, True),
                              "CIRCLES_TASK_ID": _Variable(context.task_id, True)}]
        self.calls = 0
        self.printed: list = []
        self.size = 0  # UTF-8 bytes of output so far
        self.max_output = DEFAULT_MAX_OUTPUT if context.max_output is None else context.max_output
        self.ticks = 0
        self.max_ticks = MAX_STEPS * TICKS_PER_STEP
        self.memory = 0
        self.max_memory = DEFAULT_MAX_MEMORY if context.max_memory is None else context.max_memory

    # -- what a script pays: call these before the work or the allocation, never after --

    def step(self, pos: tuple) -> None:
        """One step: a statement, an expression, a loop turn."""
        if self.ticks + TICKS_PER_STEP > self.max_ticks:
            raise _too_long(pos)
        if self.memory + STEP_BYTES > self.max_memory:
            raise _out_of_memory(pos, self.max_memory)
        self.ticks += TICKS_PER_STEP
        self.memory += STEP_BYTES

    def work(self, pos: tuple, items: int = 0, chars: int = 0) -> None:
        """Work in proportion to a size: ``items`` items and ``chars`` characters touched.
        Refused (and not counted) if it would take the script past its steps."""
        ticks = self.ticks + items * ITEM_TICKS + chars * CHAR_TICKS
        if ticks > self.max_ticks:
            raise _too_long(pos)
        self.ticks = ticks

    def allocate(self, pos: tuple, size: int) -> None:
        """``size`` bytes about to be allocated (see the module's docstring for the sizes).
        Refused (and not counted) if they would take the script past its budget."""
        if self.memory + size > self.max_memory:
            raise _out_of_memory(pos, self.max_memory)
        self.memory += size

    def stats(self, stats: Stats) -> None:
        stats.steps = -(-self.ticks // TICKS_PER_STEP)
        stats.memory = self.memory
        stats.max_steps = MAX_STEPS
        stats.max_memory = self.max_memory

    # -- output and text --

    def output(self, line: str, pos: tuple, size: Optional[int] = None) -> None:
        """Add a line of output (``size`` UTF-8 bytes when known), unless that takes the output
        over the cap: checked before the line is kept."""
        if size is None:
            self.work(pos, chars=len(line))
            size = _utf8_size(line)
        size += 1 if self.printed else 0  # newlines between lines
        if self.size + size > self.max_output:
            raise OutputTooLarge(self.max_output)
        self.allocate(pos, ITEM_BYTES + len(line) * (1 if line.isascii() else 4))  # the output's join
        self.size += size
        self.printed.append(line)

    def show(self, value: Any, pos: tuple, debug: bool = False) -> None:
        """Output ``value``'s text as a line (``print``, ``debug``, the final value), built no
        further than the room left under the output cap."""
        if not debug and type(value) is str:
            self.output(value, pos)
            return
        text = _Text(self, pos, max_chars=None, max_bytes=self.max_output - self.size - (1 if self.printed else 0))
        text.add_value(value, debug)
        self.output(text.text(), pos, text.bytes)

    def text_of(self, value: Any, pos: tuple) -> str:
        """``to_string``: at most ``MAX_STRING`` characters."""
        if type(value) is str:
            return value
        text = _Text(self, pos)
        text.add_value(value)
        return text.text()

    def concat(self, a: str, b: str, pos: tuple) -> str:
        """Two strings joined, refused before it is built if too long."""
        length = len(a) + len(b)
        if length > MAX_STRING:
            raise _error(pos, f"string longer than {MAX_STRING} characters")
        self.work(pos, chars=length)
        self.allocate(pos, _string_bytes(length, a.isascii() and b.isascii()))
        return a + b

    def converted(self, value: str, how, pos: tuple) -> str:
        """``how(value)`` for a string function whose result may be longer (``to_upper`` of
        ``"ß"`` is ``"SS"``; at most 3 times): paid for at the length of ``value`` before, the
        rest after (a transient of at most ``3 * MAX_STRING`` characters)."""
        self.work(pos, chars=len(value))
        self.allocate(pos, _string_bytes(len(value), value.isascii()))
        result = how(value)
        if len(result) > MAX_STRING:
            raise _error(pos, f"string longer than {MAX_STRING} characters")
        extra = _string_bytes(len(result), result.isascii()) - _string_bytes(len(value), value.isascii())
        if extra > 0:
            self.allocate(pos, extra)
        return result

    # -- walking values --

    def copy(self, value: Any, pos: tuple) -> Any:
        """Rhai values are values: an array or map stored somewhere new is a copy (strings and
        numbers are immutable, so shared). Copied with a stack, not recursion, a step per array
        or map and an item per item."""
        kind = type(value)
        if kind is not list and kind is not dict:
            return value
        result: Any = [] if kind is list else {}
        pending = [(value, result)]
        while pending:
            source, target = pending.pop()
            self.step(pos)
            self.work(pos, items=len(source))
            if type(source) is list:
                self.allocate(pos, ARRAY_BYTES + len(source) * ITEM_BYTES)
                append = target.append
                for item in source:
                    kind = type(item)
                    if kind is list or kind is dict:
                        item_copy: Any = [] if kind is list else {}
                        pending.append((item, item_copy))
                        item = item_copy
                    append(item)
            else:
                self.allocate(pos, MAP_BYTES + len(source) * MAP_ITEM_BYTES)
                for key, item in source.items():
                    kind = type(item)
                    if kind is list or kind is dict:
                        item_copy = [] if kind is list else {}
                        pending.append((item, item_copy))
                        item = item_copy
                    target[key] = item
        return result

    def equal(self, a: Any, b: Any, pos: tuple) -> bool:
        """Rhai's ``==``: numbers compare across int and float, other types only with their
        own, arrays and maps item by item. Walked with a stack (values may nest deeper than any
        recursion limit), paying an item per pair visited and a character per character
        compared."""
        levels: list = []
        deepest = 0  # levels paid for: the walk holds at most that many at once
        while True:
            self.work(pos, items=1)
            ta, tb = type(a), type(b)
            if ta is not tb:
                if ta not in (int, float) or tb not in (int, float) or a != b:
                    return False
            elif a is b:
                pass  # one value: equal to itself (no operation makes a NaN)
            elif ta is str:
                if len(a) != len(b):
                    return False
                self.work(pos, chars=len(a))
                if a != b:
                    return False
            elif ta is list:
                if len(a) != len(b):
                    return False
                self.work(pos, items=LEVEL_ITEMS)
                levels.append(zip(a, b))
            elif ta is dict:
                if len(a) != len(b):
                    return False
                self.work(pos, items=LEVEL_ITEMS)
                levels.append(self.map_pairs(a, b, pos))
            elif a != b:  # numbers, bools, ranges (compared in constant time), ()
                return False
            if len(levels) > deepest:
                self.allocate(pos, LEVEL_BYTES)
                deepest += 1
            while levels:
                pair = next(levels[-1], None)
                if pair is not None:
                    a, b = pair
                    break
                levels.pop()
            else:
                return True

    def map_pairs(self, a: dict, b: dict, pos: tuple) -> Iterator:
        """The items of two maps of one size, paired by key (``_ABSENT`` when ``b`` lacks one)."""
        for key, item in a.items():
            self.work(pos, chars=len(key))  # finding the key in b compares it
            yield item, b.get(key, _ABSENT)

    def sorted_keys(self, value: dict, pos: tuple) -> list:
        """A map's keys in order (``keys``, ``values`` and a map's text give them so), the sort
        paid for: n log n items, and the keys' characters."""
        count = len(value)
        self.work(pos, items=count * max(1, count.bit_length()))
        self.work(pos, chars=sum(map(len, value)))
        self.allocate(pos, ARRAY_BYTES + count * ITEM_BYTES)
        return sorted(value)


    # -- variables --

    def lookup(self, name: str, pos: tuple) -> _Variable:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise _error(pos, f"variable not found: {name}")

    # -- statements --

    def block(self, node: tuple, new_scope: bool = True) -> Any:
        if new_scope:
            self.scopes.append({})
        try:
            value = UNIT
            for statement in node[2]:
                value = self.statement(statement)
            return value
        finally:
            if new_scope:
                self.scopes.pop()

    def statement(self, node: tuple) -> Any:
        kind, pos = node[0], node[1]
        self.step(pos)
        if kind == "let":
            _, _, name, init, constant = node
            value = UNIT if init is None else self.copy(self.expression(init), pos)
            self.scopes[-1][name] = _Variable(value, constant)
            return UNIT
        if kind == "assign":
            self.assign(node)
            return UNIT
        if kind == "while":
            _, _, condition, body = node
            while condition is None or self.condition(condition):
                self.step(pos)
                if not self.iteration(body):
                    break
            return UNIT
        if kind == "for":
            self.for_(node)
            return UNIT
        if kind == "break":
            raise _Break()
        if kind == "continue":
            raise _Continue()
        if kind == "return":
            raise _Return(UNIT if node[2] is None else self.expression(node[2]))
        return self.expression(node)

    def condition(self, node: tuple) -> bool:
        value = self.expression(node)
        if not isinstance(value, bool):
            raise _error(node[1], f"a condition must be a bool, not {type_name(value)}")
        return value

    def iteration(self, body) -> bool:
        """One pass of a loop's body; False when it broke out of the loop."""
        try:
            self.block(body)
        except _Break:
            return False
        except _Continue:
            pass
        return True

    def for_(self, node: tuple) -> None:
        _, pos, name, index_name, iterable_node, body = node
        iterable = self.expression(iterable_node)
        items: range | list
        if isinstance(iterable, range):
            items = iterable
        elif isinstance(iterable, list):
            self.work(pos, items=len(iterable))
            self.allocate(pos, ARRAY_BYTES + len(iterable) * ITEM_BYTES)
            items = list(iterable)  # as in Rhai, changing the array in the loop does not change the loop
        elif isinstance(iterable, str):
            raise _error(iterable_node[1], "iterating over a string's characters is not supported by this engine")
        elif isinstance(iterable, dict):
            raise _error(iterable_node[1], "a map cannot be iterated (use keys() or values())")
        else:
            raise _error(iterable_node[1], f"cannot iterate over {type_name(iterable)}")
        for i, item in enumerate(items):
            self.step(pos)
            scope = {name: _Variable(self.copy(item, pos), False)}
            if index_name is not None:
                scope[index_name] = _Variable(i, False)
            self.scopes.append(scope)
            try:
                going = self.iteration(body)
            finally:
                self.scopes.pop()
            if not going:
                break

    def assign(self, node: tuple) -> None:
        _, pos, target, op, value_node = node
        value = self.copy(self.expression(value_node), pos)
        if op != "=":
            value = self.binary(op[:-1], self.expression(target), value, pos)
        kind = target[0]
        if kind == "var":
            variable = self.lookup(target[2], target[1])
            if variable.constant:
                raise _error(target[1], f"cannot assign to the constant {target[2]}")
            variable.value = value
            return
        container = self.place(target[2])
        if kind == "field":
            if not isinstance(container, dict):
                raise _error(target[1], f"cannot set a property of {type_name(container)}")
            self.step(pos)
            if target[3] not in container:
                self.allocate(pos, MAP_ITEM_BYTES)
            container[target[3]] = value
            return
        index = self.expression(target[3])
        if isinstance(container, dict):
            if not isinstance(index, str):
                raise _error(target[1], "a map's key must be a string")
            self.step(pos)
            self.work(pos, chars=len(index))  # hashing the key, comparing it
            if index not in container:
                self.allocate(pos, MAP_ITEM_BYTES)
            container[index] = value
        elif isinstance(container, list):
            container[self.position(container, index, target[1])] = value
        else:
            raise _error(target[1], f"cannot index into {type_name(container)} to assign")

    def place(self, node: tuple) -> Any:
        """The array or map an assignment or a mutating method changes; refuses constants. Not
        in a variable (``(a + b)[0]``, ``if c { a } else { b }[0]``), it is a temporary: a copy,
        so that changing it changes no variable (as in Rhai)."""
        root = node
        while root[0] in ("index", "field"):
            root = root[2]
        if root[0] != "var":
            return self.copy(self.expression(node), node[1])
        if self.lookup(root[2], root[1]).constant:
            raise _error(root[1], f"cannot change the constant {root[2]}")
        return self.expression(node)

    @staticmethod
    def position(array: list, index: Any, pos: tuple) -> int:
        if type(index) is not int:
            raise _error(pos, f"an array index must be an integer, not {type_name(index)}")
        i = index + len(array) if index < 0 else index
        if not 0 <= i < len(array):
            raise _error(pos, f"array index {index} out of bounds (length {len(array)})")
        return i

    # -- expressions --

    def expression(self, node: tuple) -> Any:
        kind, pos = node[0], node[1]
        self.step(pos)
        if kind == "lit":
            return node[2]
        if kind == "var":
            return self.lookup(node[2], pos).value
        if kind == "binary":
            return self.binary(node[2], self.expression(node[3]), self.expression(node[4]), pos)
        if kind == "unary":
            return self.unary(node[2], self.expression(node[3]), pos)
        if kind in ("&&", "||"):
            left = self.expression(node[2])
            if not isinstance(left, bool):
                raise _error(pos, f"'{kind}' needs bools, not {type_name(left)}")
            if left == (kind == "||"):
                return left
            right = self.expression(node[3])
            if not isinstance(right, bool):
                raise _error(pos, f"'{kind}' needs bools, not {type_name(right)}")
            return right
        if kind == "??":
            left = self.expression(node[2])
            return self.expression(node[3]) if left is UNIT else left
        if kind == "call":
            return self.call(node)
        if kind == "index":
            container = self.expression(node[2])
            index = self.expression(node[3])
            if isinstance(container, list):
                return container[self.position(container, index, pos)]
            if isinstance(container, dict):
                if not isinstance(index, str):
                    raise _error(pos, "a map's key must be a string")
                self.work(pos, chars=len(index))  # hashing the key, comparing it
                return container.get(index, UNIT)
            if isinstance(container, str):
                raise _error(pos, "indexing a string is not supported by this engine")
            raise _error(pos, f"cannot index into {type_name(container)}")
        if kind == "field":
            container = self.expression(node[2])
            if not isinstance(container, dict):
                raise _error(pos, f"{type_name(container)} has no property {node[3]}")
            return container.get(node[3], UNIT)
        if kind == "array":
            self.work(pos, items=len(node[2]))
            self.allocate(pos, ARRAY_BYTES + len(node[2]) * ITEM_BYTES)
            return [self.copy(self.expression(item), pos) for item in node[2]]
        if kind == "map":
            self.work(pos, items=len(node[2]))
            self.allocate(pos, MAP_BYTES + len(node[2]) * MAP_ITEM_BYTES)
            return {key: self.copy(self.expression(item), pos) for key, item in node[2]}
        if kind == "tmpl":
            text = _Text(self, pos)
            for part in node[2]:
                if isinstance(part, str):
                    text.add(part)
                else:
                    text.add_value(self.block(part))
            return text.text()
        if kind == "if":
            _, _, condition, then, otherwise = node
            if self.condition(condition):
                return self.block(then)
            if otherwise is None:
                return UNIT
            return self.expression(otherwise) if otherwise[0] == "if" else self.block(otherwise)
        if kind == "block":
            return self.block(node)
        raise _error(pos, f"unsupported: {kind}")  # pragma: no cover - the parser makes no other node

    def unary(self, op: str, value: Any, pos: tuple) -> Any:
        if op == "!":
            if not isinstance(value, bool):
                raise _error(pos, f"'!' needs a bool, not {type_name(value)}")
            return not value
        if type(value) is int:
            return _check_int(-value if op == "-" else value, pos)
        if type(value) is float:
            return -value if op == "-" else value
        raise _error(pos, f"'{op}' needs a number, not {type_name(value)}")

    def binary(self, op: str, a: Any, b: Any, pos: tuple) -> Any:
        ta, tb = type(a), type(b)
        if op == "==":
            return self.equal(a, b, pos)
        if op == "!=":
            return not self.equal(a, b, pos)
        if op == "in":
            return self.contains(b, a, pos)
        numbers = ta in (int, float) and tb in (int, float)
        if op in ("<", "<=", ">", ">="):
            if not (numbers or (ta is tb and ta is str)):
                if ta is not tb and not numbers:
                    return False  # as in Rhai: values of different types are not ordered
                raise _error(pos, f"cannot compare {type_name(a)} {op} {type_name(b)}")
            if ta is str:
                self.work(pos, chars=min(len(a), len(b)))
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
        if op == "+":
            if ta is str or tb is str:
                if a is UNIT or b is UNIT:
                    return a if b is UNIT else b
                if ta is str and tb is str:
                    return self.concat(a, b, pos)
                text = _Text(self, pos)
                text.add_value(a)
                text.add_value(b)
                return text.text()
            if ta is list and tb is list:
                self.work(pos, items=len(a) + len(b))
                self.allocate(pos, ARRAY_BYTES + (len(a) + len(b)) * ITEM_BYTES)
                return a + self.copy(b, pos)
        if op in ("..", "..="):
            if ta is not int or tb is not int:
                raise _error(pos, f"a range needs integers, not {type_name(a)} and {type_name(b)}")
            return range(a, b + 1 if op == "..=" else b)
        if ta is bool and tb is bool and op in ("&", "|", "^"):
            return {"&": a and b, "|": a or b, "^": a != b}[op]
        if not numbers:
            raise _error(pos, f"function not found: {type_name(a)} {op} {type_name(b)}")
        if ta is int and tb is int:
            return self.integer(op, a, b, pos)
        if op in ("&", "|", "^", "<<", ">>"):
            raise _error(pos, f"function not found: {type_name(a)} {op} {type_name(b)}")
        a, b = float(a), float(b)
        if op in ("/", "%") and b == 0:
            raise _error(pos, "division by zero")
        try:
            result = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                      "%": lambda: math.fmod(a, b), "**": lambda: math.pow(a, b)}[op]()
        except (OverflowError, ValueError):
            result = math.nan
        if not math.isfinite(result):
            raise _error(pos, f"the result of {_float_text(a)} {op} {_float_text(b)} is not a finite number")
        return result

    @staticmethod
    def integer(op: str, a: int, b: int, pos: tuple) -> int:
        if op in ("/", "%"):
            if b == 0:
                raise _error(pos, "division by zero")
            quotient = abs(a) // abs(b)
            quotient = quotient if (a >= 0) == (b >= 0) else -quotient  # truncates, as Rhai does
            return _check_int(quotient, pos) if op == "/" else a - b * quotient
        if op == "**":
            if b < 0:
                raise _error(pos, f"integer raised to a negative power: {a} ** {b}")
            if abs(a) > 1 and b > 63:
                raise _error(pos, "integer overflow (Rhai integers are 64-bit)")
            return _check_int(a ** b, pos)
        if op in ("<<", ">>"):
            if op == ">>":
                b = -b
            if abs(b) > 63:
                raise _error(pos, f"shift by too many bits: {b}")
            result = (a << b) & (2 ** 64 - 1) if b >= 0 else a >> -b
            return result - 2 ** 64 if result > INT_MAX else result
        result = {"+": a + b, "-": a - b, "*": a * b, "&": a & b, "|": a | b, "^": a ^ b}[op]
        return _check_int(result, pos)

    def contains(self, container: Any, item: Any, pos: tuple) -> bool:
        if isinstance(container, list):
            return any(self.equal(element, item, pos) for element in container)
        if isinstance(container, str) and isinstance(item, str):
            self.work(pos, chars=len(container) + len(item))  # CPython's search is linear
            return item in container
        if isinstance(container, dict) and isinstance(item, str):
            self.work(pos, chars=len(item))  # hashing it, comparing it
            return item in container
        if isinstance(container, range) and type(item) is int:
            return item in container
        raise _error(pos, f"function not found: {type_name(item)} in {type_name(container)}")

    # -- calls --

    def call(self, node: tuple) -> Any:
        _, pos, name, arg_nodes, method = node
        if method and name in MUTATING and arg_nodes[0][0] in ("var", "index", "field"):
            args = [self.place(arg_nodes[0])] + [self.expression(arg) for arg in arg_nodes[1:]]
        else:
            args = [self.expression(arg) for arg in arg_nodes]
        function = self.functions.get((name, len(args)))
        if function is not None:
            if method:
                raise _error(pos, f"calling the script function {name} as a method (with 'this') is not supported")
            return self.call_script(function, args, pos)
        builtin = BUILTINS.get(name)
        if builtin is None:
            raise _error(pos, f"function not found: {name}({', '.join(type_name(arg) for arg in args)})")
        return builtin(self, pos, *args) if _accepts(builtin, len(args)) else self.no_function(name, args, pos)

    @staticmethod
    def no_function(name: str, args: list, pos: tuple):
        raise _error(pos, f"function not found: {name}({', '.join(type_name(arg) for arg in args)})")

    def call_script(self, function: tuple, args: list, pos: tuple) -> Any:
        _, _, name, params, body = function
        if self.calls >= MAX_CALL_DEPTH:
            raise _error(pos, f"too many nested function calls (more than {MAX_CALL_DEPTH})")
        scopes = self.scopes
        self.scopes = [{param: _Variable(self.copy(arg, pos), False) for param, arg in zip(params, args)}]
        self.calls += 1
        try:
            return self.block(body, new_scope=False)
        except _Return as r:
            return r.value
        except (_Break, _Continue):
            raise _error(pos, f"break or continue outside a loop in {name}") from None
        finally:
            self.calls -= 1
            self.scopes = scopes


def _accepts(function, count: int) -> bool:
    code = function.__code__
    required = code.co_argcount - 2 - len(function.__defaults__ or ())
    return required <= count <= code.co_argcount - 2


def _wrong(name: str, pos: tuple, *args):
    raise _error(pos, f"function not found: {name}({', '.join(type_name(arg) for arg in args)})")


def _print(ev: _Evaluator, pos, value):
    ev.show(value, pos)
    return UNIT


def _debug_print(ev: _Evaluator, pos, value):
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
        return _check_int(int(value), pos)
    return _wrong("to_int", pos, value)


def _to_float(ev, pos, value):
    if type(value) in (int, float):
        return float(value)
    return _wrong("to_float", pos, value)


def _abs(ev, pos, value):
    if type(value) is int:
        return _check_int(abs(value), pos)
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
        raise _error(pos, "range step cannot be zero")
    return range(start, end, step)


BUILTINS: dict[str, Callable[..., Any]]
BUILTINS = {"print": _print, "debug": _debug_print, "len": _len, "is_empty": _is_empty, "push": _push,
            "pop": _pop, "contains": _contains, "keys": _keys, "values": _values, "to_string": _to_string,
            "to_int": _to_int, "to_float": _to_float, "abs": _abs, "to_upper": _to_upper,
            "to_lower": _to_lower, "type_of": _type_of, "range": _range}
MUTATING = {"push", "pop"}


def run(script: str, context: ScriptContext, stats: Optional[Stats] = None) -> str:
    """The engine callable (``circles-worker --engine circles.worker.tiny_engine:run``);
    ``stats``, if given, is filled in with what the run used (also when it is refused)."""
    if len(script) > MAX_SCRIPT:
        raise EngineError(f"script longer than {MAX_SCRIPT} characters")
    functions: dict = {}
    try:
        tree = _Parser(_Tokenizer(script).tokens(), functions).script()
    except RecursionError:
        raise EngineError("script nested too deeply") from None
    evaluator = _Evaluator(context, functions)
    value: Any = UNIT
    try:
        if context.data is not None:  # a webhook event's JSON text: a string the script holds
            size = _string_bytes(len(context.data), context.data.isascii())
            if size > evaluator.max_memory:
                raise EngineError(f"CIRCLES_DATA ({len(context.data)} characters) is over the script memory limit "
                                  f"({evaluator.max_memory} bytes)")
            evaluator.allocate((1, 1), size)
            evaluator.scopes[0]["CIRCLES_DATA"] = _Variable(context.data, True)
        try:
            value = evaluator.block(tree, new_scope=False)
        except _Return as r:
            value = r.value
        except (_Break, _Continue):
            raise EngineError("break or continue outside a loop") from None
        if value is not UNIT:
            evaluator.show(value, tree[2][-1][1] if tree[2] else tree[1])
    except RecursionError:
        raise EngineError("script nested too deeply") from None
    except OutputTooLarge:
        raise  # its output is the matter: none of it is passed on
    except EngineError as e:
        e.output = output_of_lines(evaluator.printed)  # what it printed before the error, for the caller
        raise
    finally:
        if stats is not None:
            evaluator.stats(stats)
    return output_of_lines(evaluator.printed)
