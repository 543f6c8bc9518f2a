"""The tiny engine's parser: tokens to a tree (recursive descent) of nodes, each a tuple
``(kind, pos, ...)``."""

from __future__ import annotations

from circles.worker.engine_api import EngineError
from circles.worker.tiny_engine.values import MAX_DEPTH, UNIT, check_int, error

#: Binary operators: precedence (higher binds tighter), as in Rhai's table; ``**`` is right-associative.
BINARY = {"||": 30, "|": 30, "^": 30, "&&": 60, "&": 60, "==": 90, "!=": 90, "in": 110, "<": 130,
          "<=": 130, ">": 130, ">=": 130, "??": 135, "..": 140, "..=": 140, "+": 150, "-": 150,
          "*": 180, "/": 180, "%": 180, "**": 190, "<<": 210, ">>": 210}
ASSIGNMENTS = {"=", "+=", "-=", "*=", "/=", "%=", "**=", "<<=", ">>=", "&=", "|=", "^="}


class Parser:
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
        return error(pos, f"unexpected {what}" + (f" ({hint})" if hint else ""))

    def nest(self, pos: tuple) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise error(pos, "expression nested too deeply")

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
                    raise error(self.token[2], "functions can only be defined at the top level")
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
            raise error(name_pos, "expected a function name")
        self.expect("(")
        params: list = []
        while not self.at(")"):
            kind, param, param_pos = self.take()
            if kind != "name":
                raise error(param_pos, "expected a parameter name")
            if param in params:
                raise error(param_pos, f"duplicate parameter: {param}")
            params.append(param)
            if not self.at(")"):
                self.expect(",")
        self.take()
        if (name, len(params)) in self.functions:
            raise error(name_pos, f"function {name} with {len(params)} parameters is defined twice")
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
                raise error(name_pos, f"expected a variable name after '{value}'")
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
                raise error(op_pos, "cannot assign to this expression")
            return ("assign", op_pos, target, op, self.expression()), True
        return target, True

    def name(self) -> str:
        kind, value, pos = self.take()
        if kind != "name":
            raise error(pos, "expected a variable name")
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
                return ("lit", pos, check_int(-operand[2], pos))
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
                        raise error(name_pos, "expected a property or method name after '.'")
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
                    parser = Parser(part, self.functions, self.depth + 1)
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
                    raise error(key_pos, "expected a property name")
                self.expect(":")
                entries.append((key, self.expression()))
                if not self.at("}"):
                    self.expect(",")
            self.take()
            return ("map", pos, entries)
        if kind == "op" and value == "{":
            return self.block()
        raise self.unexpected()
