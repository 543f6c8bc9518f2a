"""The try-out's engine: a small expression language with no way out of its sandbox."""

import pytest

from circles.tiny_engine import run
from circles.worker import EngineError, ScriptContext

CONTEXT = ScriptContext(task_id="t", circle="02aa", caller="03bb", source="ws")


@pytest.mark.parametrize("script, output", [
    ("40 + 2", "42\n"),
    ('let x = 6 * 7;\nprint("hello, " + CALLER_ID);\nx', "hello, 03bb\n42\n"),
    ("  let a = 1;\n    const b = (a +\n  2);\nprint(b)", "3\n"),
    ("7 / 2; -7 / 2", "-3\n"),
    ("7.0 / 2", "3.5\n"),
    ('"n=" + 1 + " " + (1 < 2)', "n=1 true\n"),
    ('let s = "let x"; s', "let x\n"),
    ("CONTEXT_ID == \"02aa\" && 2 ** 8", "256\n"),
    ("let y = 1", ""),
    ('!true || (false && "!" != "&&") || !false', "true\n"),
])
def test_scripts(script, output):
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
