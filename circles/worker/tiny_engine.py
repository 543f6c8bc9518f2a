"""A tiny Rhai-flavoured expression language, run in the worker's process: the try-out's engine.

    let x = 6 * 7;
    print("hello " + CALLER_ID);
    x

Why not ``sh`` for the try-out: ``--auth`` proves who a caller is, not that they may run code,
and any key can sign a nonce; WebSockets ignore the same-origin policy, so any web page open in
the user's browser could reach a try-out on localhost and run shell commands as the user. This
engine has no I/O at all: it evaluates expressions with Python's ``ast`` restricted to a
whitelist (numbers, strings, booleans, arithmetic, comparisons, ``&&``/``||``/``!``,
``let``, ``print``), with caps
on number size, string length, the number of steps and the output (checked at every
``print``: a script printing in bulk stops once over the cap, it never builds the whole output). ``rhai-run`` replaces it in earnest:
``circles-worker --exec 'rhai-run {script_file}'``.

The output is what ``print`` printed (one line per call) followed by the value of the last
statement when it is an expression. ``CONTEXT_ID`` (the circle) and ``CALLER_ID`` (the caller)
are predefined, as in the ecosystem's Rhai workers. As in Rhai, ``/`` between integers
truncates, and ``+`` with a string on either side concatenates.
"""

from __future__ import annotations

import ast
import io
import operator
import tokenize
from typing import Any

from circles.worker.engines import DEFAULT_MAX_OUTPUT, EngineError, OutputTooLarge, ScriptContext, output_of_lines

MAX_SCRIPT = 64 * 1024
MAX_STEPS = 100_000
MAX_INT_BITS = 4096
MAX_STRING = 64 * 1024


class _Unit:
    """The value of a statement that has none (``let``, ``print``), shown as nothing."""


UNIT = _Unit()


def _to_python(script: str) -> str:
    """Rhai's ``let``/``const`` declarations and ``&&``, ``||``, ``!`` become Python, leaving
    string literals untouched (the edits are made at token positions).

    There are no blocks, so every line may start at column 0: Python's indentation rules,
    which Rhai does not have, never get in the way.
    """
    lines = script.split("\n")
    tokens = list(tokenize.generate_tokens(io.StringIO(script).readline))
    edits = []  # (row, start, end, replacement)
    for i, token in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        (row, start), (_, end) = token.start, token.end
        if (token.type == tokenize.NAME and token.string in ("let", "const") and following is not None
                and following.type == tokenize.NAME and following.start[0] == row):
            edits.append((row, start, following.start[1], ""))
        elif (token.string in ("&", "|") and following is not None and following.string == token.string
                and following.start == token.end):
            edits.append((row, start, following.end[1], " and " if token.string == "&" else " or "))
        elif token.string == "!" and not (following is not None and following.string == "=" and following.start == token.end):
            edits.append((row, start, end, " not "))
    for row, start, end, replacement in sorted(edits, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:start] + replacement + line[end:]
    return "\n".join(line.lstrip() for line in lines)


def _check_number(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise EngineError(f"integer larger than {MAX_INT_BITS} bits")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise EngineError(f"string longer than {MAX_STRING} characters")
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _divide(a, b):
    if b == 0:
        raise EngineError("division by zero")
    if isinstance(a, int) and isinstance(b, int):
        quotient = abs(a) // abs(b)
        return quotient if (a >= 0) == (b >= 0) else -quotient  # truncates, as Rhai does
    return a / b


def _modulo(a, b):
    if b == 0:
        raise EngineError("division by zero")
    return a % b


def _power(a, b):
    if isinstance(b, int) and isinstance(a, int) and (b < 0 or b * max(a.bit_length(), 1) > MAX_INT_BITS):
        raise EngineError("exponent out of range")
    return a ** b


def _add(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return _show(a) + _show(b)
    return a + b


def _multiply(a, b):
    if isinstance(a, str) or isinstance(b, str):
        raise EngineError("cannot multiply strings")
    return a * b


_BINARY = {ast.Add: _add, ast.Sub: operator.sub, ast.Mult: _multiply, ast.Div: _divide,
           ast.Mod: _modulo, ast.Pow: _power}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_NAMES = {"true": True, "false": False}


class _Evaluator:
    def __init__(self, context: ScriptContext) -> None:
        self.variables: dict = {"CONTEXT_ID": context.circle, "CALLER_ID": context.caller}
        self.printed: list = []
        self.size = 0  # UTF-8 bytes of output so far
        self.max_output = DEFAULT_MAX_OUTPUT if context.max_output is None else context.max_output
        self.steps = 0

    def output(self, line: str) -> None:
        """Add a line of output, unless that takes the output over the cap."""
        self.size += len(line.encode("utf-8", "surrogatepass")) + (1 if self.printed else 0)  # newlines between
        if self.size > self.max_output:
            raise OutputTooLarge(self.max_output)
        self.printed.append(line)

    def statement(self, node: ast.stmt) -> Any:
        if isinstance(node, ast.Expr):
            return self.expression(node.value)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            self.variables[node.targets[0].id] = self.expression(node.value)
            return UNIT
        raise EngineError(f"line {node.lineno}: unsupported statement")

    def expression(self, node: ast.expr) -> Any:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise EngineError("script too long")
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return _check_number(node.value)
        if isinstance(node, ast.Name):
            if node.id in self.variables:
                return self.variables[node.id]
            if node.id in _NAMES:
                return _NAMES[node.id]
            raise EngineError(f"line {node.lineno}: variable not found: {node.id}")
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self.expression(node.left), self.expression(node.right)
            return _check_number(self._apply(_BINARY[type(node.op)], node, left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return self._apply(_UNARY[type(node.op)], node, self.expression(node.operand))
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = self.expression(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right = self.expression(right_node)
                if not self._apply(_COMPARE[type(op)], node, left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.BoolOp):  # and / or
            value = None
            for operand in node.values:
                value = self.expression(operand)
                if isinstance(node.op, ast.And) != bool(value):
                    return value
            return value
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
                and len(node.args) == 1 and not node.keywords):
            self.output(_show(self.expression(node.args[0])))
            return UNIT
        raise EngineError(f"line {getattr(node, 'lineno', '?')}: unsupported expression")

    @staticmethod
    def _apply(function, node: ast.expr, *args) -> Any:
        try:
            return function(*args)
        except EngineError:
            raise
        except (TypeError, ValueError, OverflowError, ArithmeticError) as e:
            raise EngineError(f"line {node.lineno}: {e}") from None


def run(script: str, context: ScriptContext) -> str:
    """The engine callable (``circles-worker --engine circles.worker.tiny_engine:run``)."""
    if len(script) > MAX_SCRIPT:
        raise EngineError(f"script longer than {MAX_SCRIPT} characters")
    try:
        tree = ast.parse(_to_python(script), mode="exec")
    except (SyntaxError, tokenize.TokenError, ValueError) as e:
        line = getattr(e, "lineno", None)
        raise EngineError(f"syntax error{f' on line {line}' if line else ''}") from None
    except (RecursionError, MemoryError):
        raise EngineError("script nested too deeply") from None
    evaluator = _Evaluator(context)
    value: Any = UNIT
    try:
        for statement in tree.body:
            value = evaluator.statement(statement)
        if value is not UNIT:
            evaluator.output(_show(value))
    except RecursionError:
        raise EngineError("script nested too deeply") from None
    return output_of_lines(evaluator.printed)
