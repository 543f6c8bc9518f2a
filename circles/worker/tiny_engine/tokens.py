"""The tiny engine's tokenizer: a script's text to tokens, each a tuple ``(kind, value, (line,
column))``; the kinds are int float str tmpl name kw op eof."""

from __future__ import annotations

import math
import re

from circles.worker.tiny_engine.values import INT_MAX, check_string, error

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
#: SYMBOLS by their first character, longest first: a symbol is found in a few comparisons.
SYMBOLS_BY_FIRST: dict[str, list[str]] = {}
for _symbol in SYMBOLS:
    SYMBOLS_BY_FIRST.setdefault(_symbol[0], []).append(_symbol)
#: What the tokenizer skips or takes in one step, in C: white space (``str.isspace``'s, which is
#: ``\s``'s) and line comments, the rest of a name (ASCII letters, digits, ``_``), a run of ASCII
#: digits.
_SPACE = re.compile(r"(?:\s+|//[^\n]*)+")
_WORD = re.compile(r"[0-9A-Za-z_]*")
_DIGITS = re.compile(r"[0-9]+")
#: A run of plain characters in a string (no quote, backslash or line end) and in a backtick
#: string (no backtick, no ``$``): taken in one step.
_PLAIN = re.compile(r'[^"\\\n]+')
_PLAIN_TEMPLATE = re.compile(r"[^`$]+")
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


class Tokenizer:
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

    def jump(self, j: int) -> None:
        """To ``j``, counting the lines passed (as :meth:`advance` would, one step at a time)."""
        lines = self.text.count("\n", self.i, j)
        if lines:
            self.line += lines
            self.line_start = self.text.rfind("\n", self.i, j) + 1
        self.i = j

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
                    raise error(pos, "unterminated ${ in a string")
                out.append(("eof", None, pos))
                return out
            c = text[self.i]
            if until_brace and c == "}" and depth == 0:
                self.i += 1
                out.append(("eof", None, pos))
                return out
            if c.isdigit():
                out.append(self.number(pos))
            elif c.isalpha() or c == "_":
                j = _WORD.match(text, self.i).end()  # type: ignore[union-attr]  # (it matches "" at least)
                word = text[self.i:j]
                if not word.isidentifier():
                    raise error(pos, f"unexpected character {text[self.i]!r}")
                self.i = j  # (no line ends in a name, nor in a symbol below)
                if word in UNSUPPORTED:
                    raise error(pos, f"'{word}' is not supported by this engine")
                out.append(("kw" if word in KEYWORDS else "name", word, pos))
            elif c == '"':
                out.append(("str", self.string(pos), pos))
            elif c == "`":
                out.append(("tmpl", self.template(pos), pos))
            elif c == "'":
                raise error(pos, "character literals are not supported by this engine (use a string)")
            else:
                for symbol in SYMBOLS_BY_FIRST.get(c, ()):
                    if text.startswith(symbol, self.i):
                        break
                else:
                    raise error(pos, f"unexpected character {c!r}")
                if symbol in ("{", "#{"):
                    depth += 1
                elif symbol == "}":
                    depth -= 1
                self.i += len(symbol)
                out.append(("op", symbol, pos))

    def skip_space(self) -> None:
        text = self.text
        while self.i < len(text):
            space = _SPACE.match(text, self.i)
            if space is not None:
                self.jump(space.end())
            elif text.startswith("/*", self.i):
                pos, nesting = self.pos(), 0
                while True:
                    if self.i >= len(text):
                        raise error(pos, "unterminated comment")
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
        run = _DIGITS.match(text, j)
        if run is not None and run.end() - j <= 18:
            # The usual case in one step: up to 18 ASCII digits (under INT_MAX), followed by
            # nothing that would make it another number (or an error) below.
            after = text[run.end():run.end() + 1]
            if not (after.isalnum() or after == "_" or after == "."):
                self.i = run.end()
                return ("int", int(text[j:self.i]), pos)
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
                raise error(pos, f"invalid number {text[self.i:j]!r}") from None
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
                raise error(pos, f"invalid number {text[self.i:j + 1]!r}")
            digits = text[self.i:j].replace("_", "")
            try:
                value = int(digits) if kind == "int" else float(digits)
            except ValueError:
                raise error(pos, f"invalid number {text[self.i:j]!r}") from None
            if kind == "float" and not math.isfinite(value):
                raise error(pos, f"number out of range: {text[self.i:j]}")
        if kind == "int" and value > INT_MAX:
            raise error(pos, f"integer out of range: {text[self.i:j]}")
        self.advance(j - self.i)
        return (kind, value, pos)

    def string(self, pos: tuple) -> str:
        text = self.text
        self.advance()  # the opening quote
        parts: list[str] = []
        while True:
            if self.i >= len(text) or text[self.i] == "\n":
                raise error(pos, "unterminated string")
            plain = _PLAIN.match(text, self.i)
            if plain is not None:
                parts.append(plain.group())
                self.i = plain.end()
                continue
            c = text[self.i]
            if c == '"':
                self.advance()
                return check_string("".join(parts), pos)
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
                        raise error(escape_pos, f"invalid escape \\{nxt}{digits}") from None
                    self.advance(2 + size)
                else:
                    raise error(escape_pos, f"invalid escape \\{nxt}")
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
                raise error(pos, "unterminated string")
            plain = _PLAIN_TEMPLATE.match(text, self.i)
            if plain is not None:
                piece.append(plain.group())
                self.jump(plain.end())
                continue
            c = text[self.i]
            if c == "`":
                if text.startswith("``", self.i):  # a doubled backtick is one backtick
                    piece.append("`")
                    self.advance(2)
                    continue
                self.advance()
                parts.append(check_string("".join(piece), pos))
                return parts
            if text.startswith("${", self.i):
                parts.append(check_string("".join(piece), pos))
                piece = []
                self.advance(2)
                parts.append(self.tokens(until_brace=True))
            else:
                piece.append(c)
                self.advance()
