"""The tiny engine's cost is bounded by what a script does, not by how many statements it has.

Measured as quantities, never as times: the steps and bytes the engine charged
(``run(..., stats=Stats())``) and what Python really allocated (tracemalloc); the peak RSS of a
child process running the worst attacks is in tests/integration/test_tiny_engine_bounds.py.
The attacks are the issue's: ``==`` between two doubled 2^15-item arrays in a loop (106 s of a
busy reactor before), and the text of an array of 2^13 or 2^18 references to one 64 KiB string
(512 MiB and 16 GiB of text; 1.0 to 1.6 GB peaks, and an OOM kill).
"""

import random
import re
import sys
import tracemalloc

import pytest

from circles.worker.engines import EngineError, OutputTooLarge, ScriptContext
from circles.worker.tiny_engine import (
    CHARS_PER_STEP,
    DEFAULT_MAX_MEMORY,
    ITEMS_PER_STEP,
    MAX_STEPS,
    MAX_STRING,
    Stats,
    evaluator,
    run,
)

CONTEXT = ScriptContext(task_id="t", circle="02aa", caller="03bb", source="ws")
STEPS_ERROR = rf"^line \d+, column \d+: step limit reached: more than {MAX_STEPS} steps \(a loop that never ends\?\)$"
MEMORY_ERROR = r"^line \d+, column \d+: script memory limit exceeded \(\d+ bytes\)$"
STRING_ERROR = rf"^line \d+, column \d+: string longer than {MAX_STRING} characters$"
OUTPUT_ERROR = r"^output too large: more than \d+ bytes$"
#: Every way a script may be stopped for what it costs.
REFUSALS = "|".join([r"step limit reached: more than \d+ steps \(a loop that never ends\?\)$", MEMORY_ERROR, STRING_ERROR, OUTPUT_ERROR,
                     r"nested too deeply", r"too many nested function calls"])
#: What Python may allocate besides what the engine accounts for: the parse tree, and the
#: bounded transients of the docstring (a piece being checked, an escaped or upper-cased string).
SLACK = 2 * 1024 * 1024


def doubling(name: str, init: str, times: int) -> str:
    """``let name = init;`` then ``name += name;`` ``times`` times: 2^times copies in few lines."""
    return f"let {name} = {init};\n" + f"{name} += {name};\n" * times


def shared_refs(times: int) -> str:
    """An array of 2^times references to one 64 KiB string (``s`` doubled 16 times)."""
    return doubling("s", '"x"', 16) + doubling("a", "[s]", times)


EQ_LOOP = doubling("a", "[0]", 15) + doubling("b", "[0]", 15) + "let n = 0;\nloop { if a == b { n += 1 } }"


def measured(script: str, context: ScriptContext = CONTEXT):
    """Run ``script``: (output or the exception, stats, bytes Python allocated at the peak)."""
    stats = Stats()
    tracemalloc.start()
    try:
        try:
            result = run(script, context, stats)
        except EngineError as e:
            result = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, stats, peak


def assert_within_budget(stats: Stats, peak: int) -> None:
    assert stats.steps <= MAX_STEPS
    assert stats.memory <= stats.max_memory
    assert peak <= stats.memory + SLACK, (peak, stats)  # the accounting is an upper bound


# -- the issue's attacks -------------------------------------------------------------------------

def test_comparing_doubled_arrays_is_paid_per_item():
    """``a == b`` of two 2^15-item arrays is 2^15 items of work (2048 steps), not one step."""
    script = doubling("a", "[0]", 15) + doubling("b", "[0]", 15) + "let n = 0;\nfor i in 0..10 { if a == b { n += 1 } }\nn"
    once, twice = Stats(), Stats()
    assert run(script.replace("0..10", "0..1"), CONTEXT, once) == "1"
    assert run(script.replace("0..10", "0..2"), CONTEXT, twice) == "2"
    assert twice.steps - once.steps >= 2 ** 15 // ITEMS_PER_STEP
    with pytest.raises(EngineError, match=STEPS_ERROR):
        run(script.replace("0..10", "0..100"), CONTEXT)  # a hundred: 204800 steps of comparing


def test_the_comparison_loop_stops_at_the_step_limit():
    """The loop that kept a reactor busy for 106 s: refused once its comparisons pass the steps
    (about 48 comparisons), with at most MAX_STEPS charged."""
    result, stats, peak = measured(EQ_LOOP)
    assert isinstance(result, EngineError) and str(result).startswith("line 34, column ")
    assert "step limit reached" in str(result)
    assert stats.steps == MAX_STEPS
    assert_within_budget(stats, peak)


@pytest.mark.parametrize("times", [13, 18])
@pytest.mark.parametrize("use, error", [
    ("print(a)", OUTPUT_ERROR),
    ("debug(a)", OUTPUT_ERROR),
    ("a", OUTPUT_ERROR),  # the final value is output too
    ("let t = a.to_string(); t.len()", STRING_ERROR),
    ("let t = to_string(a); t.len()", STRING_ERROR),
    ("let t = `${a}`; t.len()", STRING_ERROR),
    ('let t = "" + a; t.len()', STRING_ERROR),
    ("let t = a + (); t.len()", "function not found|" + STRING_ERROR),
    ('let m = #{k: a}; print(`${m}`)', STRING_ERROR + "|" + STEPS_ERROR),  # 2^18: the copy into m is 16384 steps
])
def test_text_of_shared_references_is_refused_before_it_is_built(times, use, error):
    """2^13 (or 2^18) references to one 64 KiB string are cheap to hold; their text (512 MiB, or
    16 GiB) is refused at the first piece over the limit, having built no more than the limit."""
    result, stats, peak = measured(shared_refs(times) + use)
    assert isinstance(result, EngineError), result
    assert re.search(error, str(result)), str(result)
    assert isinstance(result, OutputTooLarge) == (error == OUTPUT_ERROR)
    assert_within_budget(stats, peak)
    assert peak < 8 * 1024 * 1024  # the output cap (1 MiB) and the array, not 512 MiB


def test_shared_references_are_paid_for_once():
    """Holding an array of 2^13 references to one 64 KiB string costs 2^13 items, not 512 MiB;
    its length, an element, and a comparison with itself are cheap."""
    stats = Stats()
    assert run(shared_refs(13) + "a.len() + a[5].len()", CONTEXT, stats) == str(2 ** 13 + 2 ** 16)
    assert stats.memory < 2 * 1024 * 1024
    assert run(shared_refs(13) + "let b = a; a == b && a.contains(s) && s in a", CONTEXT) == "true"


# -- every operation pays in proportion to its size ----------------------------------------------

SIZED = (doubling("a", "[0]", 12) + doubling("b", "[0]", 12) + doubling("s", '"x"', 14) + doubling("t", '"x"', 14)
         + 'let m = #{}; for i in 0..1024 { m[`k${i}`] = i; }\nlet n = m;\nfn f(v) { 0 }\n'
         + 'let a1 = [0]; let b1 = [0]; let s1 = "x"; let t1 = "x"; let m1 = #{k0: 0}; let n1 = #{k0: 0};\n')
ITEMS, CHARS, KEYS = 2 ** 12, 2 ** 14, 1024


@pytest.mark.parametrize("operation, size", [
    # arrays of 4096 items: at least 4096 / 16 steps more than with 1
    ("a == b", ITEMS), ("a != b", ITEMS), ("a.contains(1)", ITEMS), ("1 in a", ITEMS), ("contains(a, 1)", ITEMS),
    ("a + b", ITEMS), ("a.to_string()", ITEMS), ("print(a)", ITEMS), ("debug(a)", ITEMS), ("`${a}`", ITEMS),
    ('"" + a', ITEMS), ("let c = a;", ITEMS), ("for x in a { }", ITEMS), ("[a]", ITEMS), ("#{k: a}", ITEMS),
    ("f(a)", ITEMS), ("let c = [0]; c.push(a);", ITEMS), ("let c = [0]; c[0] = a;", ITEMS), ("a", ITEMS),
    # strings of 16384 characters: at least 16384 / 64 steps more
    ("s == t", CHARS), ("s < t", CHARS), ("s >= t", CHARS), ("s + t", CHARS), ('"y" in s', CHARS),
    ('s.contains("y")', CHARS), ("s.to_upper()", CHARS), ("s.to_lower()", CHARS), ("`${s}`", CHARS),
    ("print(s)", CHARS), ("debug(s)", CHARS), ("s + 1", CHARS), ("[s].to_string()", CHARS), ("s", CHARS),
    # maps of 1024 keys: at least 1024 / 16 steps more
    ("m == n", KEYS), ("m.keys()", KEYS), ("m.values()", KEYS), ("let c = m;", KEYS), ("m.to_string()", KEYS),
    ("print(m)", KEYS), ("[m]", KEYS),
])
def test_every_operation_pays_for_the_size_of_its_values(operation, size):
    """The audit of the module's docstring, checked: an operation on a large value costs at
    least its size in items (16 a step) or characters (64 a step) more than on a small one."""
    small = operation
    for big, one in (("a", "a1"), ("b", "b1"), ("s", "s1"), ("t", "t1"), ("m", "m1"), ("n", "n1")):
        small = re.sub(rf"\b{big}\b", one, small)
    assert small != operation
    large_stats, small_stats = Stats(), Stats()
    context = ScriptContext(task_id="t", circle="02aa", caller="03bb", source="ws", max_output=1 << 24)
    run(SIZED + operation, context, large_stats)
    run(SIZED + small, context, small_stats)
    per_step = CHARS_PER_STEP if size == CHARS else ITEMS_PER_STEP
    assert large_stats.steps - small_stats.steps >= size // per_step


def test_values_nest_deeper_than_python_recursion():
    """Equality, copies and text walk values with a stack: an array nested 2000 deep (more than
    Python's recursion limit) is compared, copied and shown, paying per level."""
    script = _index_chains(random.Random(1), 0)
    depth, chains = 1, []
    while depth < 2000:
        chain = min(depth, 60)
        chains.append(f"a{'[0]' * chain} = a;")
        depth += chain
    script += " ".join(chains) + "\nlet b = a; print(a == b); let t = a.to_string(); t.len()"
    stats = Stats()
    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(1500)  # near CPython's default, whatever another test or library set
    try:
        assert run(script, CONTEXT, stats) == f"true\n{2 * depth + 1}"
    finally:
        sys.setrecursionlimit(saved)
    assert depth > 1500
    assert stats.steps > 2 * depth


# -- the memory budget ---------------------------------------------------------------------------

@pytest.mark.parametrize("script", [
    doubling("a", "[0]", 17),  # 2^17 items, copied as they double
    'let m = #{}; for i in 0..20000 { m[`key ${i}`] = i }',
    "let a = []; for i in 0..20000 { a.push([i, i]) }",
    doubling("s", '"é"', 15) + "let a = []; loop { a.push(s + s) }",
    doubling("a", "[[0]]", 12) + "loop { let b = a; }",
    "let a = [[1]]; loop { a = [a, a] }",
])
def test_a_budget_from_the_context_is_kept_as_values_are_built(script):
    """With ``max_memory`` 1 MiB, building is refused at the value that would pass it, and the
    bytes accounted (and those Python allocated) stay under it."""
    small = ScriptContext(task_id="t", circle="02aa", caller="03bb", source="ws", max_memory=1024 * 1024)
    result, stats, peak = measured(script, small)
    assert isinstance(result, EngineError), result
    assert str(result).endswith("script memory limit exceeded (1048576 bytes)"), str(result)
    assert stats.max_memory == 1024 * 1024
    assert_within_budget(stats, peak)


def test_the_default_budget():
    stats = Stats()
    run("1", CONTEXT, stats)
    assert stats.max_memory == DEFAULT_MAX_MEMORY == 64 * 1024 * 1024
    assert 0 < stats.steps < 10 and 0 < stats.memory < 1024
    with pytest.raises(EngineError, match=r"^line 1, column 57: script memory limit exceeded \(67108864 bytes\)$"):
        run("let m = #{}; for i in 0..5000 { m[`k${i}`] = i } loop { let n = m; }", CONTEXT)


def test_copies_are_paid_for_each_time():
    """Rhai values are values: every ``let`` of an array is a copy, paid for in items and bytes."""
    one, ten = Stats(), Stats()
    base = doubling("a", "[0]", 12)
    run(base + "for i in 0..1 { let b = a; }", CONTEXT, one)
    run(base + "for i in 0..10 { let b = a; }", CONTEXT, ten)
    assert ten.steps - one.steps >= 9 * 2 ** 12 // ITEMS_PER_STEP
    assert ten.memory - one.memory >= 9 * 2 ** 12 * 8  # at least a pointer an item


# -- generated scripts ---------------------------------------------------------------------------

def _generated(rng: random.Random) -> str:
    """One script of the shapes that once cost more than their steps: doubling strings, arrays
    and maps, comparisons and conversions of the results in loops, deep nesting, recursion,
    copies, huge ranges."""
    k = rng.randint(4, 19)
    loop = rng.choice(["loop", "for i in 0..9223372036854775807", "while true", f"for i in range(0, {rng.randint(1, 64)})"])
    shapes = [
        lambda: doubling("a", "[0]", k) + doubling("b", "[0]", k) + f"{loop} {{ a == b; a != b; a.contains(1); 1 in b }}",
        lambda: doubling("s", '"ab"', min(k, 15)) + doubling("a", "[s]", k)
        + f"{loop} {{ {rng.choice(['print(a)', 'debug(a)', 'let t = a.to_string();', 'let t = `${a}`;', 'let t = s + a;'])} }}",
        lambda: doubling("s", rng.choice(['"x"', '"é"', '"\\"q\\""']), min(k, 16))
        + f"{loop} {{ let t = s.to_upper(); s == t; t < s; \"xy\" in s; debug(s) }}",
        lambda: doubling("m", "#{a: 1}", 0)
        + f"for i in 0..{k} {{ m = #{{left: m, right: m}}; }} {loop} {{ let n = m; n == m; print(m.keys()); m.values() }}",
        lambda: f"let a = []; for i in 0..{rng.randint(10, 3000)} {{ a = [a]; }} {loop} {{ a == a; let b = a; print(b) }}",
        lambda: _index_chains(rng, k) + "let b = a; a == b; print(a)",
        lambda: f"fn f(n) {{ if n < 2 {{ [n] }} else {{ f(n - 1) + f(n - 2) }} }} {loop} {{ print(f({k + 5})) }}",
        lambda: f"fn deep(n) {{ if n == 0 {{ 0 }} else {{ deep(n - 1) + 1 }} }} deep({rng.randint(1, 40)})",
        lambda: f"let m = #{{}}; for i in 0..{rng.randint(10, 5000)} {{ m[`k${{i}}`] = [i, `${{i}}`]; }} {loop} {{ let c = m; c == m; `${{m}}` }}",
        lambda: f"let n = 0; for i in range({rng.randint(-9, 9)}, 9223372036854775807, {rng.randint(1, 2 ** 62)}) {{ n += 1 }} n",
        lambda: doubling("a", "[1, 2.5, \"x\", true, ()]", k) + f"{loop} {{ for x in a {{ }} let t = a.to_string(); }}",
        lambda: doubling("a", "[#{k: [1]}]", k) + f"{loop} {{ a + a; a.contains(#{{k: [2]}}) }}",
    ]
    return rng.choice(shapes)()


def _index_chains(rng: random.Random, count: int) -> str:
    """``a[0][0]...[0] = a;`` ``count`` times: an array nesting deeper at each, cheaply."""
    script, depth = "let a = [0]; ", 1
    for _ in range(count):
        chain = rng.randint(1, min(depth, 60))
        script += f"a{'[0]' * chain} = a; "
        depth += chain
    return script


@pytest.mark.parametrize("seed", range(48))
def test_generated_scripts_finish_or_are_refused_within_budget(seed, monkeypatch):
    """A tenth of the steps (so that the file stays fast under tracemalloc) and a 4 MiB budget:
    each script finishes or is refused for its cost, charged no more than its limits, and Python
    allocated no more than was accounted (plus the slack)."""
    monkeypatch.setattr(evaluator, "MAX_STEPS", MAX_STEPS // 10)
    context = ScriptContext(task_id="t", circle="02aa", caller="03bb", source="ws", max_memory=4 * 1024 * 1024)
    script = _generated(random.Random(seed))
    result, stats, peak = measured(script, context)
    if isinstance(result, EngineError):
        assert re.search(REFUSALS, str(result)), (str(result), script)
    assert stats.steps <= MAX_STEPS // 10
    assert stats.memory <= 4 * 1024 * 1024
    assert peak <= stats.memory + SLACK, (peak, stats, script)
