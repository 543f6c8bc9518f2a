"""Engines: what runs one script for the worker (:mod:`circles.worker.service`).

An *engine* is any callable ``(script, context) -> str | Deferred[str]``. Two ship here:
:class:`ExecEngine` runs an external interpreter such as ``rhai-run`` on the script in a
temporary file, and :func:`load_engine` imports a Python callable by name (the try-out's is
:mod:`circles.worker.tiny_engine`). An engine reports a script error by raising (or failing):
the exception's text becomes the task's ``error``. Output is capped at ``context.max_output``
bytes (:class:`OutputTooLarge`): checked by the worker after the engine, and by an engine while
it runs if it can (``--exec`` and the tiny engine do). :mod:`circles.worker.isolation` runs an
``--engine`` callable in child processes, so that no script can stop the worker.

A script sees none of the worker's own environment but an allow-list
(:func:`script_environment`): the worker's may hold its Redis password and webhook secrets.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from circles.backend import tasks
from circles.common.children import dies_with_this_process, how_it_ended
from circles.worker.engine_api import DEFAULT_MAX_OUTPUT as DEFAULT_MAX_OUTPUT
from circles.worker.engine_api import Engine as Engine
from circles.worker.engine_api import EngineError as EngineError
from circles.worker.engine_api import OutputTooLarge as OutputTooLarge
from circles.worker.engine_api import ScriptContext as ScriptContext
from circles.worker.engine_api import load_engine as load_engine
from circles.worker.engine_api import output_before_error as output_before_error
from circles.worker.engine_api import output_of_lines as output_of_lines
from circles.worker.engine_api import output_size as output_size

STDERR_KEPT = 8192
SCRIPT_FILE = "{script_file}"
#: Largest ``data`` passed in the environment as CIRCLES_DATA (Linux refuses to exec with one
#: environment string over 128 KiB); larger data is only in the CIRCLES_DATA_FILE file.
MAX_ENV_DATA = 64 * 1024
#: ``--prelude`` values: what :class:`ExecEngine` puts before each script (see :func:`rhai_prelude`).
PRELUDES = ("none", "rhai")
#: Most bytes of memory a script may take, by default (``--max-script-memory``): see
#: docs/worker-protocol.md, "Isolation: why child processes".
DEFAULT_MAX_MEMORY = 256 * 1024 * 1024
#: What a script's environment keeps of the worker's own (and ``LC_*``); ``--exec-env`` adds names.
PASSED_ENVIRONMENT = ("PATH", "LANG", "TZ")
#: The constants a Rhai prelude declares, by their context attribute (CIRCLES_DATA is not one of
#: them: a webhook event may be large, and stays a value in the environment and a file).
RHAI_CONSTANTS = {"CONTEXT_ID": "circle", "CALLER_ID": "caller", "CIRCLES_SOURCE": "source",
                  "CIRCLES_TASK_ID": "task_id"}


class ScriptTimedOut(EngineError):
    """The script ran past the timeout and was stopped; the server answers it -32003."""

    reason = tasks.TIMED_OUT


def output_of_stdout(stdout: str) -> str:
    """``--exec``: a command's stdout is its lines, each ended by a newline as interpreters
    print them, so the output is stdout less one final newline (``echo 20`` is ``"20"``, as
    ``print(20)`` in the tiny engine); a last line without one is kept as it is."""
    return stdout[:-1] if stdout.endswith("\n") else stdout


def passed_environment(names: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """What a script may see of the worker's environment: ``PATH`` (the system's default when the
    worker has none), ``LANG``, ``LC_*``, ``TZ`` and the variables ``names`` (``--exec-env``);
    nothing else, since the worker's own may hold its Redis password, webhook secrets or cloud
    credentials."""
    env = {name: value for name, value in os.environ.items()
           if name in PASSED_ENVIRONMENT or name.startswith("LC_") or name in names}
    env.setdefault("PATH", os.defpath)
    return env


def script_environment(context: ScriptContext, home: str,
                       names: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """The whole environment of one script: :func:`passed_environment`, ``HOME`` and ``TMPDIR``
    set to ``home`` (the script's own fresh directory), then the context's variables
    (:meth:`ScriptContext.environment`), which no worker variable can replace."""
    env = passed_environment(names)
    env["HOME"] = env["TMPDIR"] = home
    env.update(context.environment())
    return env


def with_max_memory(engine: Engine, max_memory: int | None) -> Engine:
    """``engine`` called with ``context.max_memory`` set to ``max_memory`` when the worker gave
    none: how ``--max-script-memory`` reaches an in-process engine that accounts for what its
    scripts build (``--isolation none``)."""
    if not max_memory:
        return engine

    def bounded(script: str, context: ScriptContext) -> Any:
        if context.max_memory is None:
            context = attrs.evolve(context, max_memory=max_memory)
        return engine(script, context)

    bounded.__wrapped__ = engine  # type: ignore[attr-defined]
    return bounded


# -- the Rhai prelude -------------------------------------------------------------------------

def rhai_string(value: str) -> str:
    """``value`` as a Rhai string literal in double quotes, on one line: letters, digits and a few
    safe ASCII marks as they are, every other character as a ``\\UXXXXXXXX`` escape (no quote,
    backslash, newline or backtick ever reaches the script text). EngineError for a lone
    surrogate, which no Rhai string can hold."""
    out = []
    for char in value:
        if char.isascii() and (char.isalnum() or char in " _-.:/+=@,"):
            out.append(char)
        elif 0xD800 <= ord(char) <= 0xDFFF:
            raise EngineError("the task's context holds a lone surrogate: cannot write it as a Rhai string")
        else:
            out.append(f"\\U{ord(char):08X}")
    return '"' + "".join(out) + '"'


def rhai_prelude(context: ScriptContext) -> str:
    """``const CONTEXT_ID = "..."; const CALLER_ID = "..."; ...`` for ``context``: one line, no
    newline, to be put at the start of the script's first line (after a ``#!`` line, if any)."""
    return "".join(f"const {name} = {rhai_string(getattr(context, field))}; "
                   for name, field in RHAI_CONSTANTS.items())


def with_prelude(prelude: str, script: str) -> str:
    """``script`` with ``prelude`` (one line, no newline) at the start of its first line, or of its
    second when the first is a ``#!`` line: no line moves, so line numbers in an interpreter's
    errors are the script's own (only columns on that one line are shifted, by ``len(prelude)``)."""
    if script.startswith("#!"):
        first, newline, rest = script.partition("\n")
        if not newline:
            return script + "\n" + prelude
        return first + newline + prelude + rest
    return prelude + script


# -- the --exec engine ------------------------------------------------------------------------

class _Run(ProcessProtocol):
    transport: IProcessTransport  # set before any callback

    def __init__(self, done: Deferred, max_output: int, cleanup: Callable[[], None]) -> None:
        self.done = done
        self.max_output = max_output
        self.cleanup = cleanup  # removes the script's directory, once nothing of it runs
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.group: int | None = None

    def connectionMade(self) -> None:
        self.group = self.transport.pid  # the supervisor makes it the group's id before the script runs

    def outReceived(self, data: bytes) -> None:
        if self.done.called:
            return  # stopped already (timeout, too much output): nothing more is kept
        self.stdout += data
        if len(self.stdout) > self.max_output + 1:  # one more: the final newline is not output
            self.stdout = bytearray()
            self.done.errback(OutputTooLarge(self.max_output))
            self.kill()

    def errReceived(self, data: bytes) -> None:
        room = STDERR_KEPT - len(self.stderr)
        if room > 0:
            self.stderr += data[:room]

    def end_group(self) -> None:
        """SIGKILL every process left in the script's group (what it started in the background)."""
        if self.group is not None:
            try:
                os.killpg(self.group, signal.SIGKILL)
            except OSError:
                pass  # no such group (left already, or not made yet: then kill() kills the child)

    def kill(self) -> None:
        self.end_group()
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass  # already gone
        # Close our ends of the pipes: a process that left the group and holds them must not
        # keep us waiting.
        self.transport.loseConnection()

    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()

    def processEnded(self, reason: Failure) -> None:
        self.end_group()  # the script is over: nothing it started outlives it
        self.cleanup()
        if self.done.called:
            return
        if reason.check(ProcessDone):
            output = output_of_stdout(self.stdout.decode("utf-8", "replace"))
            size = output_size(output)
            if size > self.max_output:
                self.done.errback(OutputTooLarge(self.max_output, size))
            else:
                self.done.callback(output)
            return
        how = how_it_ended(reason)
        if reason.value.signal == signal.SIGXCPU:  # type: ignore[union-attr]  # ProcessDone or ProcessTerminated
            how = "script used all the CPU time it may (RLIMIT_CPU)"
        detail = self.stderr_text()
        error = EngineError(f"{how}: {detail}" if detail else how)
        error.output = output_of_stdout(self.stdout.decode("utf-8", "replace"))  # what it printed first
        self.done.errback(error)


class ExecEngine:
    """Runs ``command`` (e.g. ``rhai-run {script_file}``) per script, in a fresh private
    directory (mode 0700) that is its working directory, ``HOME`` and ``TMPDIR``, and is removed
    once it ended: the script is a file there, the context in the environment (a task's data
    also in a file there named by CIRCLES_DATA_FILE), and nothing else of the worker's
    environment but :func:`passed_environment` (``env_names`` adds to it); stdout less one final
    newline is the output
    (:func:`output_of_stdout`); a non-zero exit is
    an error carrying stderr; more than ``max_output`` bytes of stdout (or the context's
    ``max_output``, if smaller) is an error, and reading stops there; cancelling (the worker's
    timeout) is :class:`ScriptTimedOut`. Each command runs in its own process group, which is
    killed when it ends in any of these ways, or when this process dies: what it started in the
    background does not survive it (unless it left the group itself).

    ``prelude="rhai"`` (``--prelude rhai``) starts each script with :func:`rhai_prelude`, so a Rhai
    interpreter sees CONTEXT_ID, CALLER_ID, CIRCLES_SOURCE and CIRCLES_TASK_ID as constants (as
    under the ecosystem's Rust worker), not only as environment variables.

    ``max_memory`` bytes (RLIMIT_AS) and ``cpu_seconds`` (RLIMIT_CPU) bound each process the
    command runs, separately (limits are per process, inherited); None: no limit."""

    def __init__(self, command: str, *, reactor: Any, max_output: int = DEFAULT_MAX_OUTPUT, prelude: str = "none",
                 env_names: tuple[str, ...] | list[str] = (), max_memory: int | None = None,
                 cpu_seconds: float | None = None) -> None:
        argv = shlex.split(command)
        if not argv:
            raise ValueError("empty command")
        if not any(SCRIPT_FILE in arg for arg in argv):
            raise ValueError(f"the command must name the script as {SCRIPT_FILE}")
        executable = shutil.which(argv[0])
        if executable is None:
            raise ValueError(f"{argv[0]!r} not found (not on PATH or not executable)")
        if prelude not in PRELUDES:
            raise ValueError(f"unknown prelude {prelude!r}: one of {', '.join(PRELUDES)}")
        self.argv = [executable] + argv[1:]
        self.prelude = prelude
        self.reactor = reactor
        self.max_output = max_output
        self.env_names = tuple(env_names)
        self.limits = {"as": max_memory or 0, "cpu": math.ceil(cpu_seconds) if cpu_seconds else 0}

    def __call__(self, script: str, context: ScriptContext) -> Deferred:
        if self.prelude == "rhai":
            script = with_prelude(rhai_prelude(context), script)
        home = tempfile.mkdtemp(prefix="circles-script-")  # mode 0700

        def cleanup() -> None:
            shutil.rmtree(home, ignore_errors=True)

        try:
            path = _write(home, "script.rhai", script)
            env = script_environment(context, home, self.env_names)
            if context.data is not None:
                # Always in a file too: a webhook event may be larger than an environment allows.
                env["CIRCLES_DATA_FILE"] = _write(home, "data.json", context.data)
                if len(context.data.encode("utf-8", "surrogatepass")) > MAX_ENV_DATA:
                    del env["CIRCLES_DATA"]
        except Exception:
            cleanup()
            raise
        argv = [arg.replace(SCRIPT_FILE, path) for arg in self.argv]

        def cancel(d: Deferred) -> None:
            process.kill()
            detail = process.stderr_text()
            d.errback(ScriptTimedOut("script timed out" + (f": {detail}" if detail else "")))

        done: Deferred = Deferred(cancel)
        limit = self.max_output if context.max_output is None else min(self.max_output, context.max_output)
        process = _Run(done, limit, cleanup)
        try:
            # Under a supervisor leading the script's process group, which it kills should we die.
            self.reactor.spawnProcess(process, sys.executable,
                                      dies_with_this_process(argv, supervise=True, limits=self.limits, batch=True),
                                      env=env, path=home)
        except Exception as e:
            cleanup()
            raise EngineError(f"cannot start {argv[0]}: {e}") from None
        return done


def _write(directory: str, name: str, text: str) -> str:
    """Write ``text`` (UTF-8) to a new private file ``name`` in ``directory``; its path."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    return path

