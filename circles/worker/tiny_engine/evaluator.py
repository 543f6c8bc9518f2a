"""The tiny engine's evaluator: a parsed script run within its steps and memory budget, and
:func:`run`, the engine callable."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from circles.worker.engine_api import DEFAULT_MAX_OUTPUT, EngineError, OutputTooLarge, ScriptContext, output_of_lines
from circles.worker.tiny_engine.builtins import BUILTINS, MUTATING, accepts
from circles.worker.tiny_engine.parser import Parser
from circles.worker.tiny_engine.tokens import Tokenizer
from circles.worker.tiny_engine.values import (
    ARRAY_BYTES,
    CHAR_TICKS,
    DEFAULT_MAX_MEMORY,
    INT_MAX,
    ITEM_BYTES,
    ITEM_TICKS,
    LEVEL_BYTES,
    LEVEL_ITEMS,
    MAP_BYTES,
    MAP_ITEM_BYTES,
    MAX_CALL_DEPTH,
    MAX_SCRIPT,
    MAX_STEPS,
    MAX_STRING,
    STEP_BYTES,
    TICKS_PER_STEP,
    UNIT,
    Stats,
    Text,
    check_int,
    error,
    float_text,
    out_of_memory,
    string_bytes,
    too_long,
    type_name,
    utf8_size,
)


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


class Evaluator:
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
        self.max_steps = MAX_STEPS
        self.max_ticks = self.max_steps * TICKS_PER_STEP
        self.memory = 0
        self.max_memory = DEFAULT_MAX_MEMORY if context.max_memory is None else context.max_memory

    # -- what a script pays: call these before the work or the allocation, never after --

    def step(self, pos: tuple) -> None:
        """One step: a statement, an expression, a loop turn."""
        if self.ticks + TICKS_PER_STEP > self.max_ticks:
            raise too_long(pos, self.max_steps)
        if self.memory + STEP_BYTES > self.max_memory:
            raise out_of_memory(pos, self.max_memory)
        self.ticks += TICKS_PER_STEP
        self.memory += STEP_BYTES

    def work(self, pos: tuple, items: int = 0, chars: int = 0) -> None:
        """Work in proportion to a size: ``items`` items and ``chars`` characters touched.
        Refused (and not counted) if it would take the script past its steps."""
        ticks = self.ticks + items * ITEM_TICKS + chars * CHAR_TICKS
        if ticks > self.max_ticks:
            raise too_long(pos, self.max_steps)
        self.ticks = ticks

    def allocate(self, pos: tuple, size: int) -> None:
        """``size`` bytes about to be allocated (see the package's docstring for the sizes).
        Refused (and not counted) if they would take the script past its budget."""
        if self.memory + size > self.max_memory:
            raise out_of_memory(pos, self.max_memory)
        self.memory += size

    def stats(self, stats: Stats) -> None:
        stats.steps = -(-self.ticks // TICKS_PER_STEP)
        stats.memory = self.memory
        stats.max_steps = self.max_steps
        stats.max_memory = self.max_memory

    # -- output and text --

    def output(self, line: str, pos: tuple, size: int | None = None) -> None:
        """Add a line of output (``size`` UTF-8 bytes when known), unless that takes the output
        over the cap: checked before the line is kept."""
        if size is None:
            self.work(pos, chars=len(line))
            size = utf8_size(line)
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
        text = Text(self, pos, max_chars=None, max_bytes=self.max_output - self.size - (1 if self.printed else 0))
        text.add_value(value, debug)
        self.output(text.text(), pos, text.bytes)

    def text_of(self, value: Any, pos: tuple) -> str:
        """``to_string``: at most ``MAX_STRING`` characters."""
        if type(value) is str:
            return value
        text = Text(self, pos)
        text.add_value(value)
        return text.text()

    def concat(self, a: str, b: str, pos: tuple) -> str:
        """Two strings joined, refused before it is built if too long."""
        length = len(a) + len(b)
        if length > MAX_STRING:
            raise error(pos, f"string longer than {MAX_STRING} characters")
        self.work(pos, chars=length)
        self.allocate(pos, string_bytes(length, a.isascii() and b.isascii()))
        return a + b

    def converted(self, value: str, how, pos: tuple) -> str:
        """``how(value)`` for a string function whose result may be longer (``to_upper`` of
        ``"ß"`` is ``"SS"``; at most 3 times): paid for at the length of ``value`` before, the
        rest after (a transient of at most ``3 * MAX_STRING`` characters)."""
        self.work(pos, chars=len(value))
        self.allocate(pos, string_bytes(len(value), value.isascii()))
        result = how(value)
        if len(result) > MAX_STRING:
            raise error(pos, f"string longer than {MAX_STRING} characters")
        extra = string_bytes(len(result), result.isascii()) - string_bytes(len(value), value.isascii())
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
        raise error(pos, f"variable not found: {name}")

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
            raise error(node[1], f"a condition must be a bool, not {type_name(value)}")
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
            raise error(iterable_node[1], "iterating over a string's characters is not supported by this engine")
        elif isinstance(iterable, dict):
            raise error(iterable_node[1], "a map cannot be iterated (use keys() or values())")
        else:
            raise error(iterable_node[1], f"cannot iterate over {type_name(iterable)}")
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
                raise error(target[1], f"cannot assign to the constant {target[2]}")
            variable.value = value
            return
        container = self.place(target[2])
        if kind == "field":
            if not isinstance(container, dict):
                raise error(target[1], f"cannot set a property of {type_name(container)}")
            self.step(pos)
            if target[3] not in container:
                self.allocate(pos, MAP_ITEM_BYTES)
            container[target[3]] = value
            return
        index = self.expression(target[3])
        if isinstance(container, dict):
            if not isinstance(index, str):
                raise error(target[1], "a map's key must be a string")
            self.step(pos)
            self.work(pos, chars=len(index))  # hashing the key, comparing it
            if index not in container:
                self.allocate(pos, MAP_ITEM_BYTES)
            container[index] = value
        elif isinstance(container, list):
            container[self.position(container, index, target[1])] = value
        else:
            raise error(target[1], f"cannot index into {type_name(container)} to assign")

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
            raise error(root[1], f"cannot change the constant {root[2]}")
        return self.expression(node)

    @staticmethod
    def position(array: list, index: Any, pos: tuple) -> int:
        if type(index) is not int:
            raise error(pos, f"an array index must be an integer, not {type_name(index)}")
        i = index + len(array) if index < 0 else index
        if not 0 <= i < len(array):
            raise error(pos, f"array index {index} out of bounds (length {len(array)})")
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
                raise error(pos, f"'{kind}' needs bools, not {type_name(left)}")
            if left == (kind == "||"):
                return left
            right = self.expression(node[3])
            if not isinstance(right, bool):
                raise error(pos, f"'{kind}' needs bools, not {type_name(right)}")
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
                    raise error(pos, "a map's key must be a string")
                self.work(pos, chars=len(index))  # hashing the key, comparing it
                return container.get(index, UNIT)
            if isinstance(container, str):
                raise error(pos, "indexing a string is not supported by this engine")
            raise error(pos, f"cannot index into {type_name(container)}")
        if kind == "field":
            container = self.expression(node[2])
            if not isinstance(container, dict):
                raise error(pos, f"{type_name(container)} has no property {node[3]}")
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
            text = Text(self, pos)
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
        raise error(pos, f"unsupported: {kind}")  # pragma: no cover - the parser makes no other node

    def unary(self, op: str, value: Any, pos: tuple) -> Any:
        if op == "!":
            if not isinstance(value, bool):
                raise error(pos, f"'!' needs a bool, not {type_name(value)}")
            return not value
        if type(value) is int:
            return check_int(-value if op == "-" else value, pos)
        if type(value) is float:
            return -value if op == "-" else value
        raise error(pos, f"'{op}' needs a number, not {type_name(value)}")

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
                raise error(pos, f"cannot compare {type_name(a)} {op} {type_name(b)}")
            if ta is str:
                self.work(pos, chars=min(len(a), len(b)))
            return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
        if op == "+":
            if ta is str or tb is str:
                if a is UNIT or b is UNIT:
                    return a if b is UNIT else b
                if ta is str and tb is str:
                    return self.concat(a, b, pos)
                text = Text(self, pos)
                text.add_value(a)
                text.add_value(b)
                return text.text()
            if ta is list and tb is list:
                self.work(pos, items=len(a) + len(b))
                self.allocate(pos, ARRAY_BYTES + (len(a) + len(b)) * ITEM_BYTES)
                return a + self.copy(b, pos)
        if op in ("..", "..="):
            if ta is not int or tb is not int:
                raise error(pos, f"a range needs integers, not {type_name(a)} and {type_name(b)}")
            return range(a, b + 1 if op == "..=" else b)
        if ta is bool and tb is bool and op in ("&", "|", "^"):
            return {"&": a and b, "|": a or b, "^": a != b}[op]
        if not numbers:
            raise error(pos, f"function not found: {type_name(a)} {op} {type_name(b)}")
        if ta is int and tb is int:
            return self.integer(op, a, b, pos)
        if op in ("&", "|", "^", "<<", ">>"):
            raise error(pos, f"function not found: {type_name(a)} {op} {type_name(b)}")
        a, b = float(a), float(b)
        if op in ("/", "%") and b == 0:
            raise error(pos, "division by zero")
        try:
            result = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                      "%": lambda: math.fmod(a, b), "**": lambda: math.pow(a, b)}[op]()
        except (OverflowError, ValueError):
            result = math.nan
        if not math.isfinite(result):
            raise error(pos, f"the result of {float_text(a)} {op} {float_text(b)} is not a finite number")
        return result

    @staticmethod
    def integer(op: str, a: int, b: int, pos: tuple) -> int:
        if op in ("/", "%"):
            if b == 0:
                raise error(pos, "division by zero")
            quotient = abs(a) // abs(b)
            quotient = quotient if (a >= 0) == (b >= 0) else -quotient  # truncates, as Rhai does
            return check_int(quotient, pos) if op == "/" else a - b * quotient
        if op == "**":
            if b < 0:
                raise error(pos, f"integer raised to a negative power: {a} ** {b}")
            if abs(a) > 1 and b > 63:
                raise error(pos, "integer overflow (Rhai integers are 64-bit)")
            return check_int(a ** b, pos)
        if op in ("<<", ">>"):
            if op == ">>":
                b = -b
            if abs(b) > 63:
                raise error(pos, f"shift by too many bits: {b}")
            result = (a << b) & (2 ** 64 - 1) if b >= 0 else a >> -b
            return result - 2 ** 64 if result > INT_MAX else result
        result = {"+": a + b, "-": a - b, "*": a * b, "&": a & b, "|": a | b, "^": a ^ b}[op]
        return check_int(result, pos)

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
        raise error(pos, f"function not found: {type_name(item)} in {type_name(container)}")

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
                raise error(pos, f"calling the script function {name} as a method (with 'this') is not supported")
            return self.call_script(function, args, pos)
        builtin = BUILTINS.get(name)
        if builtin is None:
            raise error(pos, f"function not found: {name}({', '.join(type_name(arg) for arg in args)})")
        return builtin(self, pos, *args) if accepts(builtin, len(args)) else self.no_function(name, args, pos)

    @staticmethod
    def no_function(name: str, args: list, pos: tuple):
        raise error(pos, f"function not found: {name}({', '.join(type_name(arg) for arg in args)})")

    def call_script(self, function: tuple, args: list, pos: tuple) -> Any:
        _, _, name, params, body = function
        if self.calls >= MAX_CALL_DEPTH:
            raise error(pos, f"too many nested function calls (more than {MAX_CALL_DEPTH})")
        scopes = self.scopes
        self.scopes = [{param: _Variable(self.copy(arg, pos), False) for param, arg in zip(params, args)}]
        self.calls += 1
        try:
            return self.block(body, new_scope=False)
        except _Return as r:
            return r.value
        except (_Break, _Continue):
            raise error(pos, f"break or continue outside a loop in {name}") from None
        finally:
            self.calls -= 1
            self.scopes = scopes


def run(script: str, context: ScriptContext, stats: Stats | None = None) -> str:
    """The engine callable (``circles-worker --engine circles.worker.tiny_engine:run``);
    ``stats``, if given, is filled in with what the run used (also when it is refused)."""
    if len(script) > MAX_SCRIPT:
        raise EngineError(f"script longer than {MAX_SCRIPT} characters")
    functions: dict = {}
    try:
        tree = Parser(Tokenizer(script).tokens(), functions).script()
    except RecursionError:
        raise EngineError("script nested too deeply") from None
    evaluator = Evaluator(context, functions)
    value: Any = UNIT
    try:
        if context.data is not None:  # a webhook event's JSON text: a string the script holds
            size = string_bytes(len(context.data), context.data.isascii())
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
