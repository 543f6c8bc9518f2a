"""The try-out's engine: a small Rhai subset with no way out of its sandbox.

What it accepts must mean what it means in Rhai (the expected outputs below are what Rhai
prints); what it does not support is refused with the line and column.
"""

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circles.worker.engines import EngineError, OutputTooLarge, ScriptContext
from circles.worker.tiny_engine import MAX_STEPS, MAX_STRING, Stats, run

CONTEXT = ScriptContext(task_id="t", circle="02aa", caller="03bb", source="ws")
I64 = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)


@pytest.mark.parametrize("script, output", [
    # The README's and the examples.
    ("40 + 2", "42"),
    ('let x = 6 * 7;\nprint("hello, " + CALLER_ID);\nx', "hello, 03bb\n42"),
    ("let x = 10; x * 2", "20"),
    ("let a = 20;\na + 1\n", "21"),
    ("2 ** 5", "32"),
    ('print(CONTEXT_ID); CALLER_ID + " " + 6 * 7', "02aa\n03bb 42"),
    ("5 > 3 == true", "true"),  # > binds tighter than ==: no chained comparison
    ("#{a: 1}", '#{"a": 1}'),  # an object map, not a comment
    ("// comment\n1", "1"),
    # Statements and layout.
    ("  let a = 1;\n    const b = (a +\n  2);\nprint(b)", "3"),
    ("7 / 2; -7 / 2", "-3"),
    ("-7 % 3; 7 % -3", "1"),
    ("7.0 / 2", "3.5"),
    ("1 + 2.5", "3.5"),
    ("3.0", "3.0"),
    ("0.1 + 0.2", "0.30000000000000004"),
    ("1.5e20", "1.5e20"),
    ('"n=" + 1 + " " + (1 < 2)', "n=1 true"),
    ('let s = "let x"; s', "let x"),
    ('let s = "a // b /* c */"; s', "a // b /* c */"),
    ("let y = 1", ""),
    ("let y;", ""),
    ('!true || (false && "!" != "&&") || !false', "true"),
    ("1 /* inline */ + /* nested /* comments */ */ 2 // to the end\n", "3"),
    ("1_000_000 + 0xff + 0o7 + 0b11", "1000265"),
    ('"tab\\tquote\\"back\\\\slash\\u00e9"', 'tab\tquote"back\\slashé'),
    # Rhai's precedence.
    ("1 + 2 * 3 ** 2", "19"),
    ("2 ** 3 ** 2", "512"),
    ("-2 ** 2", "4"),
    ("1 < 2 < 3", "false"),  # (1 < 2) < 3: a bool and an integer are not ordered
    ("true == 1", "false"),
    ("1 == 1.0", "true"),
    ("1 | 2 ^ 7 & 3", "0"),  # || | ^ at one level, && & at a higher one: (1 | 2) ^ (7 & 3)
    ("true & false | true", "true"),
    ("1 << 3 + 1", "9"),  # << binds tighter than +
    ("1 << 63", "-9223372036854775808"),
    ("-9223372036854775807 - 1", "-9223372036854775808"),
    ("2 in [1, 2] && \"b\" in \"abc\" && \"k\" in #{k: 1} && 3 in 0..5", "true"),
    ("() ?? 5", "5"),
    # Control flow.
    ("let x = if 2 > 1 { \"yes\" } else { \"no\" }; x", "yes"),
    ("let n = 15;\nif n % 15 == 0 { print(\"fizzbuzz\") } else if n % 3 == 0 { print(\"fizz\") } else { print(n) }",
     "fizzbuzz"),
    ("if false { 1 }", ""),
    ("let s = 0; for i in range(0, 10) { s += i } s", "45"),
    ("for i in range(10, 0, -3) { print(i) }", "10\n7\n4\n1"),
    ("for x in 0..3 { print(x) } for x in 1..=2 { print(x) }", "0\n1\n2\n1\n2"),
    ('for (x, i) in ["a", "b"] { print(`${i}: ${x}`) }', "0: a\n1: b"),
    ("let i = 0; while i < 5 { i += 1; if i == 3 { continue } print(i) }", "1\n2\n4\n5"),
    ("let i = 0; loop { i += 1; if i > 3 { break; } } i", "4"),
    ("let x = 1; { let x = 2; print(x); } x", "2\n1"),
    ("let x = 1; let x = x + 1; x", "2"),  # shadowing
    ("let v = { let a = 40; a + 2 }; v", "42"),
    # Functions: no access to outer variables, values passed as copies, recursion.
    ("fn add(a, b) { a + b }\nadd(40, 2)", "42"),
    ("fn fib(n) { if n < 2 { n } else { fib(n - 1) + fib(n - 2) } }\nfib(15)", "610"),
    ("fn first(a) { for x in a { return x; } () }\nfirst([7, 8])", "7"),
    ("fn f(a) { a.push(9); a }\nlet a = [1]; print(f(a)); a", "[1, 9]\n[1]"),
    ("fn f() { 1 } fn f(x) { x } f() + f(2)", "3"),
    ("let a = [[1]]; let b = [[2]]; (a + b)[0].push(5); a", "[[1]]"),  # a temporary changes no variable
    ("40 + 2; fn later() { 1 }", "42"),
    # Arrays and maps are values.
    ("let a = [1, 2, 3]; a.push(4); a", "[1, 2, 3, 4]"),
    ("let a = [1]; let b = a; b.push(2); a", "[1]"),
    ("let a = [[1], 2]; a[0].push(5); a[0][1] = 6; a[-1] += 1; a", "[[1, 6], 3]"),
    ('let a = ["x", 1.5, true, ()]; a', '["x", 1.5, true, ()]'),
    ("[1, 2] + [3]", "[1, 2, 3]"),
    ("let a = [3, 4]; a.len() + len(a) + a.pop()", "8"),
    ('let m = #{a: 1, b: [1, "x"]}; m.c = 3; m["d"] = #{}; m.d.e = 4; m', '#{"a": 1, "b": [1, "x"], "c": 3, "d": #{"e": 4}}'),
    ("let m = #{b: 2, a: 1}; print(m.keys()); m.values()", '["a", "b"]\n[1, 2]'),
    ('let m = #{}; print(m.x); m["y"] ?? "none"', "\nnone"),
    ("let m = #{\"two words\": 1,}; m[\"two words\"]", "1"),
    # Strings.
    ("let x = 5; `x = ${x}, twice ${x * 2}, ${[1, \"a\"]}`", 'x = 5, twice 10, [1, "a"]'),
    ("`a``b ${`nested ${1 + 1}`} $ {}`", "a`b nested 2 $ {}"),
    ("`two\nlines`", "two\nlines"),
    ('"a" + ()', "a"),
    ('"abc".len() + "ABC".to_lower().len()', "6"),
    ('"Hi".to_upper() + " " + type_of(1) + type_of(1.0) + type_of("") + type_of([]) + type_of(#{}) + type_of(())',
     "HI i64f64stringarraymap()"),
    ('debug("q\\"") ; 1.to_string() + to_int(2.9) + to_float(1)', '"q\\""\n121.0'),
    ("CONTEXT_ID.len() + CALLER_ID.len()", "8"),
    ("print(())", ""),
])
def test_scripts(script, output):
    assert run(script, CONTEXT) == output


@pytest.mark.parametrize("script, output", [
    ("let x = 10; x * 2", "20"),  # the example of the original's documents, answered "20"
    ('print("a")', "a"),
    ('print("a"); print("b")', "a\nb"),
    ('print("a"); 1', "a\n1"),
    ('print(""); print("")', "\n"),  # two empty lines: one newline between them
    (r'print("two\nlines")', "two\nlines"),
    (r'print("ends with one\n")', "ends with one\n"),  # what a script prints is kept as it is
    ("", ""),
    ('let x = 1; print("x")', "x"),  # a final statement without a value adds no line
])
def test_output_is_lines_joined_by_newlines(script, output):
    """docs/worker-protocol.md, "A play's output": the printed lines, then the final value's
    text, joined by newlines, no newline after the last."""
    assert run(script, CONTEXT) == output


@pytest.mark.parametrize("script, error", [
    # The examples of Python leaking through.
    ("let = 5", "line 1, column 5: expected a variable name after 'let'"),
    ("let x = 1\nlet y = 2", "line 2, column 1: unexpected 'let' \\(expected ';'\\)"),
    # Arithmetic as Rhai's i64.
    ("1 / 0", "line 1, column 3: division by zero"),
    ("1 % 0", "line 1, column 3: division by zero"),
    ("1.0 / 0", "line 1, column 5: division by zero"),
    ("9223372036854775807 + 1", "line 1, column 21: integer overflow"),
    ("-9223372036854775807 - 2", "line 1, column 22: integer overflow"),
    ("let big = 3037000500;\nbig * big", "line 2, column 5: integer overflow"),
    ("(-9223372036854775807 - 1) / -1", "line 1, column 28: integer overflow"),
    ("2 ** 63", "line 1, column 3: integer overflow"),
    ("2 ** 100000", "line 1, column 3: integer overflow"),
    ("2 ** -1", "negative power"),
    ("9223372036854775808", "line 1, column 1: integer out of range"),
    ("1 << 64", "shift by too many bits"),
    ("1e308 * 10", "not a finite number"),
    ("(-8.0) ** 0.5", "not a finite number"),
    ('"a" * 1000000', "line 1, column 5: function not found: string \\* i64"),
    ("[1] - 1", "function not found: array - i64"),
    ("true < false", "cannot compare bool < bool"),
    # Names, types and values.
    ("x", "line 1, column 1: variable not found: x"),
    ("\n  x.push(1)", "line 2, column 3: variable not found: x"),
    ("const X = 1; X = 2", "line 1, column 14: cannot assign to the constant X"),
    ("const A = [1]; A.push(2)", "cannot change the constant A"),
    ("CALLER_ID = \"me\"", "cannot assign to the constant CALLER_ID"),
    ("let x = 1; fn f() { x } f()", "line 1, column 21: variable not found: x"),  # functions do not capture
    ("fn f() { CONTEXT_ID } f()", "variable not found: CONTEXT_ID"),
    ("{ let a = 1; } a", "line 1, column 16: variable not found: a"),
    ("if 1 { 2 }", "line 1, column 4: a condition must be a bool, not i64"),
    ("while 0 { }", "a condition must be a bool"),
    ("1 && true", "line 1, column 3: '&&' needs bools, not i64"),
    ("!1", "'!' needs a bool"),
    ("-\"a\"", "'-' needs a number"),
    ("[1, 2][5]", "line 1, column 7: array index 5 out of bounds"),
    ('[1]["a"]', "an array index must be an integer"),
    ('"abc"[0]', "indexing a string is not supported"),
    ("1.x", "i64 has no property x"),
    ("for x in 5 { }", "cannot iterate over i64"),
    ('for c in "ab" { }', "iterating over a string"),
    ("for k in #{a: 1} { }", "a map cannot be iterated"),
    ("nope(1)", "line 1, column 1: function not found: nope\\(i64\\)"),
    ("len(1)", "function not found: len\\(i64\\)"),
    ("len()", "function not found: len\\(\\)"),
    ("fn f(a) { a } f(1, 2)", "function not found: f\\(i64, i64\\)"),
    ("fn f(x) { 1 } 1.f()", "calling the script function f as a method"),
    ("range(0, 5, 0)", "range step cannot be zero"),
    ("break", "break or continue outside a loop"),
    ("fn f() { break; } loop { f() }", "break or continue outside a loop in f"),
    # Syntax: refused with a position, never read another way.
    ("let x = 1 +", "line 1, column 12: unexpected end of script"),
    ("1 +\n  * 2", "line 2, column 3: unexpected '\\*'"),
    ("fn f(a, a) { }", "duplicate parameter: a"),
    ("fn f() { } fn f() { }", "defined twice"),
    ("if true { fn g() { } }", "functions can only be defined at the top level"),
    ("1 = 2", "cannot assign to this expression"),
    ("let x = 1; x = y = 2", "line 1, column 18: unexpected '='"),
    ("'a'", "line 1, column 1: character literals are not supported"),
    ('"abc', "line 1, column 1: unterminated string"),
    ("`abc ${1 + }`", "unexpected end of script"),
    ("`abc ${1", "unterminated \\$\\{"),
    ("1 /* open", "line 1, column 3: unterminated comment"),
    ('"\\q"', "line 1, column 2: invalid escape \\\\q"),
    ("switch x { }", "line 1, column 1: 'switch' is not supported"),
    ("let f = |x| x + 1;", "line 1, column 9: unexpected '\\|'"),
    ("x++", "unexpected"),
    ("a => b", "line 1, column 4: unexpected '>'"),
    ("12abc", "invalid number"),
    ("été", "unexpected character"),
    # No Python reachable.
    ('open("/etc/passwd")', "function not found: open\\(string\\)"),
    ('__import__("os").system("id")', "function not found: __import__"),
    ("(1).__class__", "i64 has no property __class__"),
    ('"".__class__.__mro__', "string has no property __class__"),
    ("[c for c in ()]", "line 1, column 4: unexpected 'for'"),
    ("import os", "'import' is not supported"),
    ("eval(\"1\")", "'eval' is not supported"),
    ("lambda: 1", "line 1, column 7: unexpected ':'"),
])
def test_errors(script, error):
    with pytest.raises(EngineError, match=error):
        run(script, CONTEXT)


def test_errors_carry_line_and_column_first():
    for script in ("1 / 0", "let = 5", "x", "`${y}`", "9223372036854775807 + 1"):
        with pytest.raises(EngineError, match=r"^line \d+, column \d+: "):
            run(script, CONTEXT)


@pytest.mark.parametrize("script, error", [
    ("-" * 50000 + "1", "nested too deeply"),
    ("(" * 5000 + "1" + ")" * 5000, "nested too deeply"),
    ("[" * 5000, "nested too deeply"),
    ("{" * 5000, "nested too deeply"),
    ("#{a: " * 5000, "nested too deeply"),
    ("`${" * 3000 + "1" + "}`" * 3000, "nested too deeply"),
    ("let a = [1]; a" + "[0]" * 5000, "nested too deeply"),
    ("CALLER_ID" + ".len().to_string()" * 2000, "nested too deeply"),
    ("fn f() { f() } f()", "too many nested function calls"),
    ("fn f(n) { [f(n + 1)] } f(0)", "too many nested function calls|nested too deeply"),
    # It said "script too long", of a script one line long.
    ("loop { }", rf"^line 1, column \d+: step limit reached: more than {MAX_STEPS} steps \(a loop that never ends\?\)$"),
    ("let i = 0; while true { i += 1 }", "step limit reached"),
    ('let s = "x"; loop { s += s }', f"string longer than {MAX_STRING} characters"),
    ("let a = [1]; loop { a += a }", "step limit reached"),
    ("let a = [[1]]; loop { a = [a, a] }", "step limit reached|nested too deeply"),
    ("let a = [1]; loop { a.push(a) }", "step limit reached"),
])
def test_limits(script, error):
    """Every script stops, with an EngineError, in bounded time and memory."""
    import tracemalloc
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(EngineError, match=error):
            run(script, CONTEXT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024
    assert time.monotonic() - started < 30  # tracemalloc slows it down; about a second without


def test_a_function_cannot_leave_the_caller_without_its_variables():
    """A failing call leaves the scopes as they were (the next play starts clean anyway)."""
    assert run("fn f(n) { n / 0 } let a = 1; let r = 0; for i in range(0, 3) { r += i } r + a", CONTEXT) == "4"


def test_rhai_book_examples():
    """Scripts in the manner of the Rhai book's first chapters."""
    script = """
        // Variables and constants
        let x = 3;              // ok
        let _x = 42;            // ok
        const MAX = 10;
        x += MAX;
        print(`x is ${x}`);
        /* Blocks
           have their own scope */
        let y = { let z = 2; z * x };
        print(y);
        // Arrays
        let arr = [1, 2.0, "hello", true, [42]];
        print(arr[4][0] + arr.len());
        arr[2] = "world";
        print(arr);
        // Object maps
        let obj = #{ a: 42, b: "hi", "c d": [1] };
        obj.a += 1;
        obj.new_field = 1;
        print(obj.a + obj["new_field"]);
        print(obj);
        // Loops
        let total = 0;
        for n in range(1, 6) { if n == 4 { continue; } total += n; }
        let count = 10;
        while count > 0 { count -= 3; }
        print(`${total} ${count}`);
        // Functions
        fn factorial(n) {
            if n <= 1 { return 1; }
            n * factorial(n - 1)
        }
        factorial(20)
    """
    assert run(script, CONTEXT) == (
        "x is 13\n26\n47\n"
        '[1, 2.0, "world", true, [42]]\n44\n'
        '#{"a": 43, "b": "hi", "c d": [1], "new_field": 1}\n'
        "11 -2\n2432902008176640000")
    with pytest.raises(EngineError, match="integer overflow"):
        run(script.replace("factorial(20)", "factorial(21)"), CONTEXT)


def _reference(op: str, a: int, b: int):
    """Rhai's checked i64 arithmetic, written independently: the result or None for an error."""
    if op in ("/", "%"):
        if b == 0:
            return None
        q = int(a / b) if abs(a) < 2 ** 52 and abs(b) < 2 ** 52 else (abs(a) // abs(b)) * (1 if (a < 0) == (b < 0) else -1)
        result = q if op == "/" else a - b * q
    else:
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return result if -(2 ** 63) <= result < 2 ** 63 else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(I64, st.sampled_from(["+", "-", "*", "/", "%"]), I64)
def test_integer_arithmetic_is_checked_i64(a, op, b):
    expected = _reference(op, a, b)
    def literal(n):  # as in Rhai, -9223372036854775808 is not a literal (9223372036854775808 is out of range)
        return f"({n + 1} - 1)" if n == -(2 ** 63) else str(n)
    script = f"let a = {literal(a)}; let b = {literal(b)}; a {op} b"
    if expected is None:
        with pytest.raises(EngineError, match="overflow|division by zero"):
            run(script, CONTEXT)
    else:
        assert run(script, CONTEXT) == f"{expected}"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["==", "!=", "<", ">", "<=", ">="]), st.integers(-3, 3)), min_size=1, max_size=4),
       st.integers(-3, 3))
def test_comparisons_are_left_associative_by_precedence(chain, first):
    """``a < b == c``: the higher-precedence operators first, then left to right; a bool and
    an integer are never equal and never ordered."""
    script = str(first) + "".join(f" {op} {n}" for op, n in chain)
    levels = {"==": 90, "!=": 90, "<": 130, ">": 130, "<=": 130, ">=": 130}

    def value(tokens):  # precedence climbing over the same table, with Rhai's mixed-type rules
        def compare(op, x, y):
            if type(x) is not type(y):
                return op == "!="
            return {"==": x == y, "!=": x != y, "<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op]

        def parse(i, min_level):
            left, i = tokens[i], i + 1
            while i < len(tokens) and levels[tokens[i]] > min_level:
                op = tokens[i]
                right, i = parse(i + 1, levels[op])
                left = compare(op, left, right)
            return left, i
        return parse(0, 0)[0]

    tokens = [first] + [x for pair in chain for x in pair]
    if any(isinstance(tokens[i], bool) for i in range(len(tokens))):
        pass
    try:
        expected = value(tokens)
    except TypeError:  # an ordering between two bools: refused by the engine too
        with pytest.raises(EngineError, match="cannot compare bool"):
            run(script, CONTEXT)
        return
    assert run(script, CONTEXT) == ("true" if expected else "false")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("xy019.,;:()[]{}+-*/%<>!&|^=\"`\n' ")
                                 + ["let ", "const ", "fn ", "if ", "else ", "for ", " in ", "while ", "loop ", "#{",
                                    "${", "//", "/*", "*/", "**", "..", "==", "&&", "range(0, 3)", "print(", "return "]),
                max_size=40).map("".join))
def test_any_text_runs_or_fails_with_an_engine_error(script):
    """Whatever the text, the engine answers a string or raises EngineError: nothing else
    escapes (no Python exception, no hang)."""
    try:
        output = run(script, CONTEXT)
    except EngineError as e:
        assert str(e)
    else:
        assert isinstance(output, str)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200).filter(lambda s: "`" not in s and "$" not in s))
def test_backtick_strings_keep_any_text(text):
    assert run(f"`{text}`", CONTEXT) == text


def test_white_space_skipped_in_one_step_is_str_isspace():
    """The tokenizer skips white space with a regular expression: the same characters as
    ``str.isspace``, every code point checked."""
    from circles.worker.tiny_engine.tokens import _SPACE

    assert [c for c in map(chr, range(0x110000)) if (_SPACE.fullmatch(c) is not None) != c.isspace()] == []


_LAYOUT = st.lists(st.sampled_from([" ", "\t", "\n", "\r\n", "\u2028", "\u00a0", "// note\n", "/* a\nb */",
                                    "let x = 1;", "x", "42", '"a\\nb"', "`t\n${x}\n`", "+"]), max_size=30).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(_LAYOUT, st.sampled_from(["", "`a\nb ${ 1 + ", "#{ a: "]))
def test_positions_count_every_line_passed(before, opened):
    """Runs of space, comments and plain text are taken in one step: the line and column of
    what comes after them are still those of the text, lines counted at each "\n" (the only
    line end the tokenizer counts). Every piece tokenizes, so the "@" is the first error."""
    text = before + opened
    line = text.count("\n") + 1
    column = len(text) - (text.rfind("\n") + 1) + 1
    with pytest.raises(EngineError, match=f"^line {line}, column {column}: unexpected character '@'"):
        run(text + "@", CONTEXT)


def _big_printer(prints: int) -> str:
    """A script that prints a 64 KiB string ``prints`` times (doubling 1 character 16 times)."""
    lines = ['let s0 = "x";'] + [f"let s{i + 1} = s{i} + s{i};" for i in range(16)]
    return "\n".join(lines + ["print(s16);"] * prints)


def test_output_is_capped_while_it_runs():
    """The cap stops the script at the print that passes it: memory stays near the cap even
    for a script that would print 32 MiB (the issue's 65 KB script printed 475 MB)."""
    import tracemalloc
    script = _big_printer(512)
    tracemalloc.start()
    try:
        with pytest.raises(EngineError, match="^output too large: more than 1048576 bytes$"):
            run(script, CONTEXT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024
    with pytest.raises(OutputTooLarge):
        run('let s = "x"; for i in range(0, 10) { s += s } loop { print(s) }', CONTEXT)


def test_output_cap_from_the_context():
    capped = ScriptContext(task_id="t", circle="02aa", caller="03bb", source="ws", max_output=6)
    assert run('print("ab"); 420', capped) == "ab\n420"  # 6 bytes: at the cap is fine
    with pytest.raises(EngineError, match="^output too large: more than 6 bytes$"):
        run('print("ab"); 4200', capped)
    assert run('print("abcdef")', capped) == "abcdef"  # no newline after the last line, none counted
    with pytest.raises(EngineError, match="^output too large: more than 6 bytes$"):
        run('print("abc"); print("abc")', capped)  # 7 bytes with the newline between them
    with pytest.raises(EngineError, match="^output too large: more than 6 bytes$"):
        run('print("abcdeé")', capped)  # bytes, not characters: 6 characters, 7 bytes
    assert run(_big_printer(15), CONTEXT) == "\n".join(["x" * 65536] * 15)  # under the default 1 MiB


def _rhai_float(value: float) -> str:
    """How Rhai shows an f64, written independently with Decimal: positional from 1e-13 to
    1e13, exponent form outside, always with the shortest digits that read back the same."""
    from decimal import Decimal
    if value == 0:
        return "-0.0" if str(value).startswith("-") else "0.0"
    decimal = Decimal(repr(value))
    if abs(value) >= 1e13 or abs(value) < 1e-13:
        sign, digits, exponent = decimal.as_tuple()
        mantissa = "".join(map(str, digits)).rstrip("0") or "0"
        text = mantissa[0] + ("." + mantissa[1:] if len(mantissa) > 1 else "")
        return ("-" if sign else "") + f"{text}e{exponent + len(digits) - 1}"
    text = format(decimal, "f")
    return text if "." in text else text + ".0"


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                 st.floats(min_value=1e-15, max_value=1e17), st.floats(min_value=-1e-3, max_value=1e-3)))
def test_floats_are_shown_as_rhai_shows_them(value):
    literal = repr(abs(value))
    script = f"-{literal}" if str(value).startswith("-") else literal
    assert run(script, CONTEXT) == _rhai_float(value)
    assert run(f"[{script}]", CONTEXT) == f"[{_rhai_float(value)}]"


def test_a_webhook_event_is_CIRCLES_DATA_as_docs_webhooks_says():
    """docs/webhooks.md's default script, with a handler: the event's JSON text is a constant,
    next to CIRCLES_SOURCE and CIRCLES_TASK_ID; a play has no CIRCLES_DATA."""
    event = '{"id": "evt_1", "type": "payment_intent.succeeded"}'
    context = ScriptContext(task_id="t1", circle="02aa", caller="", source="webhook:stripe", data=event)
    script = "fn on_stripe_event(event) { print(event); event.len() }\non_stripe_event(CIRCLES_DATA)"
    assert run(script, context) == f"{event}\n{len(event)}"
    assert run("CIRCLES_SOURCE + \" \" + CIRCLES_TASK_ID", context) == "webhook:stripe t1"
    with pytest.raises(EngineError, match="constant"):
        run("CIRCLES_DATA = 1", context)
    with pytest.raises(EngineError, match="CIRCLES_DATA"):
        run("CIRCLES_DATA", CONTEXT)


def test_CIRCLES_DATA_is_charged_against_the_memory_budget():
    data = "x" * 10_000
    stats = Stats()
    run("1", ScriptContext(task_id="t", circle="02aa", caller="", source="webhook:stripe", data=data), stats=stats)
    assert stats.memory >= len(data)
    with pytest.raises(EngineError, match=r"CIRCLES_DATA \(10000 characters\) is over the script memory limit"):
        run("1", ScriptContext(task_id="t", circle="02aa", caller="", source="webhook:stripe", data=data,
                               max_memory=5_000))
