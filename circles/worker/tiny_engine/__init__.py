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

from circles.worker.tiny_engine.evaluator import run
from circles.worker.tiny_engine.values import (
                                               CHARS_PER_STEP,
                                               DEFAULT_MAX_MEMORY,
                                               ITEMS_PER_STEP,
                                               MAX_SCRIPT,
                                               MAX_STEPS,
                                               MAX_STRING,
                                               Stats,
)

__all__ = ["CHARS_PER_STEP", "DEFAULT_MAX_MEMORY", "ITEMS_PER_STEP", "MAX_SCRIPT", "MAX_STEPS", "MAX_STRING",
           "Stats", "run"]
