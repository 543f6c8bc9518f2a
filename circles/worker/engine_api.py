"""What an engine is given and may raise: :class:`ScriptContext`, :class:`EngineError` and
:class:`OutputTooLarge`, how an output is measured, and :func:`load_engine`.

Apart from :mod:`circles.worker.engines` (the ``--exec`` engine, on Twisted) so that an engine
child (:mod:`circles.worker.engine_child`) and the tiny engine import the standard library and
attrs alone: a child replaced after ``tasks_per_child`` scripts, a deadline or a memory error
starts in tens of milliseconds of CPU, not the quarter of a second Twisted and txredisapi take.
:mod:`circles.worker.engines` offers the same names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import attrs

DEFAULT_MAX_OUTPUT = 1024 * 1024


class EngineError(Exception):
    """A script could not run or reported an error; ``str()`` is what the client sees.

    ``reason`` is the task's ``reason`` field (docs/worker-protocol.md), "" for a plain failure.
    ``output`` is what the script printed before the error (Rhai's ``print`` is a side effect the
    caller wants to see), as the output of a script that ends well is made; "" when there is none
    or it cannot be known. The worker writes it into the task's ``output`` beside ``error``.
    """

    reason = ""
    output = ""




class OutputTooLarge(EngineError):
    """The output is larger than ``limit`` bytes: ``size`` bytes, or None when the script was
    stopped once over the limit (so its full size is unknown)."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        super().__init__(f"output too large: more than {limit} bytes" if size is None
                         else f"output too large: {size} bytes, the limit is {limit}")
        self.size = size
        self.limit = limit


def output_of_lines(lines: list[str]) -> str:
    """A play's output from its lines (docs/worker-protocol.md, "A play's output"): what each
    ``print`` printed, then the text of the script's final value when it has one, joined by
    newlines, with none after the last: ``let x = 10; x * 2`` is ``"20"``, ``print("a"); 1`` is
    ``"a\\n1"``, a script with neither is ``""``."""
    return "\n".join(lines)




def output_before_error(output: str, error: str, limit: int) -> str:
    """The output printed before an error, cut so that it and ``error`` take at most ``limit``
    UTF-8 bytes together (a failed task's reply carries both, and is bounded as a result is): the
    end is kept, what was printed last before the error, with "..." where the rest was cut. An
    ``output`` that is not text (an engine's own error class may set anything) is none."""
    if not isinstance(output, str):
        return ""
    room = limit - output_size(error)
    data = output.encode("utf-8", "surrogatepass")
    if len(data) <= room:
        return output
    if room <= 3:
        return ""
    return "..." + data[len(data) - (room - 3):].decode("utf-8", "ignore")


def output_size(output: str) -> int:
    """Bytes ``output`` takes in the task and the reply (UTF-8)."""
    return len(output.encode("utf-8", "surrogatepass"))


@attrs.frozen
class ScriptContext:
    """What a script may know about its task; ``--exec`` gets it as environment variables."""

    task_id: str
    circle: str  # CONTEXT_ID
    caller: str  # CALLER_ID, "" when anonymous
    source: str  # "ws", "webhook:stripe", ...
    deadline: float | None = None  # Unix seconds, as the server wrote it
    data: str | None = None  # JSON text of the task's data (webhook events), if any
    #: Most UTF-8 bytes of output the worker will pass on; an engine that stops a script once
    #: over it (rather than building it all first) keeps its memory bounded. None: no cap given.
    max_output: int | None = None
    #: Which run of the task this is: 1, or more when a webhook task is run again because the
    #: worker running it died (at-least-once delivery); the script sees it as CIRCLES_ATTEMPT.
    attempt: int = 1
    #: Most bytes of memory the script's values may take (``--max-script-memory``); an engine
    #: that accounts for what it builds refuses a script past it. None: no bound given.
    max_memory: int | None = None

    def environment(self) -> dict[str, str]:
        env = {"CONTEXT_ID": self.circle, "CALLER_ID": self.caller,
               "CIRCLES_SOURCE": self.source, "CIRCLES_TASK_ID": self.task_id,
               "CIRCLES_ATTEMPT": str(self.attempt)}
        if self.data is not None:
            env["CIRCLES_DATA"] = self.data
        return env


Engine = Callable[[str, ScriptContext], Any]




def load_engine(spec: str) -> Engine:
    """Import ``package.module:callable``; ValueError with a one-line reason if that fails."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{spec!r} is not package.module:callable")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"no module named {e.name!r} (looked in the current directory and on the "
                             f"Python path)") from None
        raise ValueError(f"importing {module_name} failed: {e}") from None
    except Exception as e:  # anything the module raises as it runs, a SyntaxError included
        raise ValueError(f"importing {module_name} failed: {type(e).__name__}: {e}") from None
    try:
        for name in attribute.split("."):
            target = getattr(target, name)
    except AttributeError:
        raise ValueError(f"{module_name} has no {attribute}") from None
    if not callable(target):
        raise ValueError(f"{spec} is not callable")
    return target
