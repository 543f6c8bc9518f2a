"""The try-out's engine: a small expression language with no way out of its sandbox."""

import pytest

from circles.worker.tiny_engine import run
from circles.worker.engines import EngineError, ScriptContext

CONTEXT = ScriptContext(task_id="t", circle="02aa", caller="03bb", source="ws")


@pytest.mark.parametrize("script, output", [
    ("40 + 2", "42"),
    ('let x = 6 * 7;\nprint("hello, " + CALLER_ID);\nx', "hello, 03bb\n42"),
    ("  let a = 1;\n    const b = (a +\n  2);\nprint(b)", "3"),
    ("7 / 2; -7 / 2", "-3"),
    ("7.0 / 2", "3.5"),
    ('"n=" + 1 + " " + (1 < 2)', "n=1 true"),
    ('let s = "let x"; s', "let x"),
    ("CONTEXT_ID == \"02aa\" && 2 ** 8", "256"),
    ("let y = 1", ""),
    ('!true || (false && "!" != "&&") || !false', "true"),
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
    ("1 / 0", "division by zero"),
    ("x", "variable not found: x"),
    ('open("/etc/passwd")', "unsupported expression"),
    ('__import__("os").system("id")', "unsupported expression"),
    ("(1).__class__", "unsupported expression"),
    ("[c for c in ()]", "unsupported expression"),
    ("import os", "unsupported statement"),
    ("2 ** 100000", "exponent out of range"),
    ('"a" * 1000000', "cannot multiply strings"),
    ("let = ;", "syntax error"),
    ("-" * 50000 + "1", "nested too deeply"),
])
def test_errors(script, error):
    with pytest.raises(EngineError, match=error):
        run(script, CONTEXT)


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
    assert peak < 4 * 1024 * 1024


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
