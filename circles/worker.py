"""The reference worker: takes a circle's tasks from Redis and runs them with an engine.

It speaks the protocol of ``docs/worker-protocol.md`` (the Lua steps live in
:mod:`circles.tasks`): BRPOP a task id from the circles' queues, CLAIM it (``pending`` ->
``processing``; expired or vanished tasks are skipped), run the script, FINISH it
(``completed``/``error`` plus the reply on ``reply_to``, unless the server expired it meanwhile).

An *engine* runs a script: any callable ``(script, context) -> str | Deferred[str]``. Two ship
here: :class:`ExecEngine` runs an external interpreter such as ``rhai-run`` on the script in a
temporary file, and :func:`load_engine` imports a Python callable by name. An engine reports a
script error by raising (or failing): the exception's text becomes the task's ``error``. The
worker cancels the engine's Deferred when the script timeout passes, and reports that with the
task's ``reason`` ``timeout`` (:class:`ScriptTimedOut`), so the server answers -32003. Output is
capped at ``context.max_output`` bytes (:class:`OutputTooLarge`): checked by the worker after
the engine, and by an engine while it runs if it can (``--exec`` and the tiny engine do).
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import signal
import socket
import secrets
import sys
import tempfile
from typing import Any, Callable, Optional, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (CancelledError, Deferred, DeferredList, DeferredSemaphore,
                                    inlineCallbacks, maybeDeferred)
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from .logs import Logger
from twisted.python.failure import Failure
from txredisapi import RedisError

from . import tasks
from .redisconn import RedisAddress, connect, text

log = Logger()

DEFAULT_MAX_OUTPUT = 1024 * 1024
STDERR_KEPT = 8192
POLL = 1  # seconds a BRPOP waits, so a stopping worker notices within a second
SCRIPT_FILE = "{script_file}"
#: Largest ``data`` passed in the environment as CIRCLES_DATA (Linux refuses to exec with one
#: environment string over 128 KiB); larger data is only in the CIRCLES_DATA_FILE file.
MAX_ENV_DATA = 64 * 1024


class EngineError(Exception):
    """A script could not run or reported an error; ``str()`` is what the client sees.

    ``reason`` is the task's ``reason`` field (docs/worker-protocol.md), "" for a plain failure.
    """

    reason = ""


class ScriptTimedOut(EngineError):
    """The script ran past the timeout and was stopped; the server answers it -32003."""

    reason = tasks.TIMED_OUT


class OutputTooLarge(EngineError):
    """The output is larger than ``limit`` bytes: ``size`` bytes, or None when the script was
    stopped once over the limit (so its full size is unknown)."""

    def __init__(self, limit: int, size: Optional[int] = None) -> None:
        super().__init__(f"output too large: more than {limit} bytes" if size is None
                         else f"output too large: {size} bytes, the limit is {limit}")
        self.size = size
        self.limit = limit


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
    deadline: Optional[float] = None  # Unix seconds, as the server wrote it
    data: Optional[str] = None  # JSON text of the task's data (webhook events), if any
    #: Most UTF-8 bytes of output the worker will pass on; an engine that stops a script once
    #: over it (rather than building it all first) keeps its memory bounded. None: no cap given.
    max_output: Optional[int] = None

    def environment(self) -> "dict[str, str]":
        env = {"CONTEXT_ID": self.circle, "CALLER_ID": self.caller,
               "CIRCLES_SOURCE": self.source, "CIRCLES_TASK_ID": self.task_id}
        if self.data is not None:
            env["CIRCLES_DATA"] = self.data
        return env


Engine = Callable[[str, ScriptContext], Any]


# -- the --exec engine ------------------------------------------------------------------------

# Runs the command as the child of a small supervisor that leads a new session (so a process
# group) whose id is the pid Twisted sees, so that ending the script ends whatever it started
# too. The supervisor asks the kernel for SIGTERM when the worker dies (PR_SET_PDEATHSIG, Linux)
# and then kills the whole group: a worker killed with -9 leaves no script behind. It exits as
# the command did (the same status, or the same signal). -I -S: start as fast as Python can.
_NEW_SESSION_SHIM = (
    "import os, signal, sys\n"
    "os.setsid()\n"
    "def end(*_): os.killpg(0, signal.SIGKILL)\n"
    "signal.signal(signal.SIGTERM, end)\n"
    "if sys.platform.startswith('linux'):\n"
    "    import ctypes; ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): end()\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
    "    try: os.execv(sys.argv[2], sys.argv[2:])\n"
    "    except OSError as e: os.write(2, f'cannot start {sys.argv[2]}: {e.strerror}'.encode()); os._exit(1)\n"
    "status = os.waitpid(pid, 0)[1]\n"
    "if os.WIFSIGNALED(status):\n"
    "    if os.WTERMSIG(status) != signal.SIGKILL: signal.signal(os.WTERMSIG(status), signal.SIG_DFL)\n"
    "    os.kill(os.getpid(), os.WTERMSIG(status))\n"
    "os._exit(os.waitstatus_to_exitcode(status))\n"
)


def in_own_session(argv: list) -> list:
    """``argv`` (``argv[0]`` a path) run under a supervisor leading a new session and process
    group, which kills the group should this process die."""
    return [sys.executable, "-I", "-S", "-c", _NEW_SESSION_SHIM, str(os.getpid())] + argv


class _Run(ProcessProtocol):
    def __init__(self, done: Deferred, max_output: int) -> None:
        self.done = done
        self.max_output = max_output
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.group: Optional[int] = None

    def connectionMade(self) -> None:
        self.group = self.transport.pid  # the shim makes it the group's id before the script runs

    def outReceived(self, data: bytes) -> None:
        if self.done.called:
            return  # stopped already (timeout, too much output): nothing more is kept
        self.stdout += data
        if len(self.stdout) > self.max_output:
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
        if self.done.called:
            return
        if reason.check(ProcessDone):
            self.done.callback(self.stdout.decode("utf-8", "replace"))
            return
        code, signal = reason.value.exitCode, reason.value.signal
        how = f"exit status {code}" if code is not None else f"killed by signal {signal}"
        detail = self.stderr_text()
        self.done.errback(EngineError(f"{how}: {detail}" if detail else how))


class ExecEngine:
    """Runs ``command`` (e.g. ``rhai-run {script_file}``) per script: the script is in a
    temporary file, the context in the environment (a task's data also in a temporary file
    named by CIRCLES_DATA_FILE), stdout is the output; a non-zero exit is
    an error carrying stderr; more than ``max_output`` bytes of stdout (or the context's
    ``max_output``, if smaller) is an error, and reading stops there; cancelling (the worker's
    timeout) is :class:`ScriptTimedOut`. Each command runs in its own process group, which is
    killed when it ends in any of these ways, or when this process dies: what it started in the
    background does not survive it (unless it left the group itself)."""

    def __init__(self, command: str, *, reactor, max_output: int = DEFAULT_MAX_OUTPUT) -> None:
        argv = shlex.split(command)
        if not argv:
            raise ValueError("empty command")
        if not any(SCRIPT_FILE in arg for arg in argv):
            raise ValueError(f"the command must name the script as {SCRIPT_FILE}")
        executable = shutil.which(argv[0])
        if executable is None:
            raise ValueError(f"{argv[0]!r} not found (not on PATH or not executable)")
        self.argv = [executable] + argv[1:]
        self.reactor = reactor
        self.max_output = max_output

    def __call__(self, script: str, context: ScriptContext) -> Deferred:
        path = _temporary(script, ".rhai")
        paths = [path]
        argv = [arg.replace(SCRIPT_FILE, path) for arg in self.argv]
        env = dict(os.environ)
        env.update(context.environment())
        if context.data is not None:
            # Always in a file too: a webhook event may be larger than an environment allows.
            paths.append(_temporary(context.data, ".json"))
            env["CIRCLES_DATA_FILE"] = paths[-1]
            if len(context.data.encode("utf-8", "surrogatepass")) > MAX_ENV_DATA:
                del env["CIRCLES_DATA"]

        def cancel(d: Deferred) -> None:
            process.kill()
            detail = process.stderr_text()
            d.errback(ScriptTimedOut("script timed out" + (f": {detail}" if detail else "")))

        done = Deferred(cancel)
        limit = self.max_output if context.max_output is None else min(self.max_output, context.max_output)
        process = _Run(done, limit)
        def cleanup(result):
            for name in paths:
                try:
                    os.unlink(name)
                except OSError:
                    pass
            return result

        try:
            self.reactor.spawnProcess(process, sys.executable, in_own_session(argv), env=env)
        except Exception as e:
            cleanup(None)
            raise EngineError(f"cannot start {argv[0]}: {e}") from None

        return done.addBoth(cleanup)


def _temporary(text: str, suffix: str) -> str:
    """Write ``text`` (UTF-8) to a new private temporary file and return its path."""
    fd, path = tempfile.mkstemp(prefix="circles-", suffix=suffix)
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    return path


# -- the --engine engine ----------------------------------------------------------------------

def load_engine(spec: str) -> Engine:
    """Import ``package.module:callable``; ValueError with a one-line reason if that fails."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{spec!r} is not package.module:callable")
    try:
        target: Any = importlib.import_module(module_name)
        for name in attribute.split("."):
            target = getattr(target, name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name}: {e}") from None
    except AttributeError:
        raise ValueError(f"{module_name} has no {attribute}") from None
    if not callable(target):
        raise ValueError(f"{spec} is not callable")
    return target


# -- the worker -------------------------------------------------------------------------------

class Worker(Service):
    """Serves the queues of ``circles``, at most ``concurrency`` scripts at a time.

    One blocking Redis connection waits for tasks (BRPOP over all the circles' queues, only
    while a slot is free, so a task is never held without being run) and one carries the other
    commands. Stopping lets running scripts finish (they are bounded by the script timeout).

    A script's output may be at most ``max_output`` bytes (UTF-8), or the task's ``max_output``
    (what the server can send back) if smaller; a larger one is an error result, never written.
    """

    def __init__(self, address: RedisAddress, circles: Sequence[str], engine: Engine, *, reactor,
                 prefix: str = tasks.DEFAULT_PREFIX, concurrency: int = 1, script_timeout: float = 30.0,
                 task_ttl: int = tasks.TASK_TTL, worker_id: Optional[str] = None,
                 max_output: int = DEFAULT_MAX_OUTPUT) -> None:
        if not circles:
            raise ValueError("a worker needs at least one circle")
        self.address = address
        self.circles = list(circles)
        self.engine = engine
        self.reactor = reactor
        self.prefix = prefix
        self.concurrency = concurrency
        self.script_timeout = script_timeout
        self.task_ttl = task_ttl
        self.max_output = max_output
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._queues = [tasks.queue_key(prefix, circle) for circle in self.circles]
        self._slots = DeferredSemaphore(concurrency)
        self._running: "set[Deferred]" = set()
        self._blocking = None
        self._commands = None
        self._loop: Optional[Deferred] = None
        self._interruptible: Optional[Deferred] = None  # what the loop waits on that stopping may cancel
        self._connected = False

    def startService(self) -> None:
        super().startService()
        log.info("worker {worker} serving {n} circle(s) through Redis at {redis}",
                 worker=self.worker_id, n=len(self.circles), redis=self.address.redacted())
        self._blocking = connect(self.address, self.reactor)
        self._commands = connect(self.address, self.reactor, reply_timeout=10.0)
        self._loop = self._take_tasks()

    @inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._interruptible is not None:
            self._interruptible.cancel()
        if self._loop is not None:
            # A BRPOP in flight returns within POLL seconds; a task it brings is still run.
            yield self._loop.addErrback(lambda f: f.trap(CancelledError))
        if self._running:
            log.info("waiting for {n} running script(s) to finish", n=len(self._running))
            yield DeferredList(list(self._running), consumeErrors=True)
        factories = [f for f in (self._blocking, self._commands) if f is not None]
        self._blocking = self._commands = None
        yield DeferredList([f.disconnect() for f in factories], consumeErrors=True)

    @inlineCallbacks
    def _interruptibly(self, d: Deferred):
        self._interruptible = d
        try:
            return (yield d)
        finally:
            self._interruptible = None

    @inlineCallbacks
    def _take_tasks(self):
        queues = list(self._queues)
        while self.running:
            yield self._interruptibly(self._slots.acquire())
            if not self.running:
                self._slots.release()
                return
            try:
                # Both connections up before taking a task: one taken must be claimable.
                yield self._interruptibly(self._commands.getConnection(peek=True))
                connection = yield self._interruptibly(self._blocking.getConnection(peek=True))
                if not self._connected:
                    self._connected = True
                    log.info("connected to Redis, waiting for tasks")
                reply = yield connection.brpop(queues, timeout=POLL)
            except CancelledError:
                self._slots.release()
                raise
            except RedisError as e:
                self._slots.release()
                if self._connected:
                    self._connected = False
                    log.warn("lost the Redis connection ({error}); reconnecting", error=str(e))
                continue
            queues.append(queues.pop(0))  # take turns between circles
            if not reply:
                self._slots.release()
                continue
            d = self._run_task(text(reply[1]))
            self._running.add(d)
            d.addBoth(self._task_done, d)

    def _task_done(self, result, d: Deferred) -> None:
        self._running.discard(d)
        self._slots.release()
        if isinstance(result, Failure):
            log.failure("running a task", result)

    def _eval(self, script: str, keys: list, args: list) -> Deferred:
        if self._commands is None or self._commands.size == 0:
            raise RedisError("not connected to Redis")
        return self._commands.handler.eval(script, keys, args)

    @inlineCallbacks
    def _run_task(self, task_id: str):
        key = tasks.task_key(self.prefix, task_id)
        now = self.reactor.seconds()
        try:
            fields = yield self._eval(tasks.CLAIM, [key], [tasks.timestamp(now), self.worker_id])
        except RedisError as e:
            log.warn("could not claim task {task}: {error}", task=task_id, error=str(e))
            return
        if not fields:
            log.info("skipped task {task}: expired or gone", task=task_id)
            return
        task = {text(k): text(v) for k, v in zip(fields[0::2], fields[1::2])}
        try:
            deadline: Optional[float] = float(task.get("deadline", ""))
        except ValueError:
            deadline = None
        max_output = self.max_output
        try:
            if int(task.get("max_output", "")) > 0:
                max_output = min(max_output, int(task["max_output"]))
        except ValueError:
            pass  # no cap from the server (an older one): ours alone
        context = ScriptContext(task_id=task_id, circle=task.get("circle", ""), caller=task.get("caller", ""),
                                source=task.get("source", ""), deadline=deadline, data=task.get("data"),
                                max_output=max_output)
        timeout = self.script_timeout
        if deadline is not None:
            # No use running past the server's deadline; a second of grace for clock skew.
            timeout = min(timeout, max(deadline - now + 1.0, 1.0))
        log.debug("running task {task} for circle {circle}", task=task_id, circle=context.circle)
        status, output, error, reason = tasks.COMPLETED, "", "", ""
        try:
            output = yield self._execute(task.get("script", ""), context, timeout)
            size = output_size(output)
            if size > max_output:  # an engine that did not stop at the cap itself
                output = ""
                raise OutputTooLarge(max_output, size)
        except EngineError as e:
            status, error, reason = tasks.ERROR, _capped(str(e), max_output), e.reason
        except Exception as e:
            log.failure("the engine failed on task {task}", task=task_id)
            status, error = tasks.ERROR, _capped(f"{type(e).__name__}: {e}", max_output)
        reply_to = task.get("reply_to", "")
        keys = [key, reply_to] if reply_to else [key]
        outcome = tasks.Outcome(task_id, status, output, error, reason)
        try:
            written = yield self._eval(tasks.FINISH, keys, [
                status, output, error, tasks.timestamp(self.reactor.seconds()), self.task_ttl,
                tasks.encode_reply(outcome), reason])
        except RedisError as e:
            log.warn("could not record the result of task {task}: {error}", task=task_id, error=str(e))
            return
        if not written:
            log.info("task {task} expired while it ran; result dropped", task=task_id)

    def _execute(self, script: str, context: ScriptContext, timeout: float) -> Deferred:
        d = maybeDeferred(self.engine, script, context)
        timer = self.reactor.callLater(timeout, d.cancel)

        def stop_timer(result):
            if timer.active():
                timer.cancel()
            return result

        def timed_out(failure: Failure):
            failure.trap(CancelledError)
            raise ScriptTimedOut(f"script timed out after {timeout:g}s")

        def as_text(output: Any) -> str:
            if output is None:
                return ""
            if isinstance(output, bytes):
                return output.decode("utf-8", "replace")
            if not isinstance(output, str):
                raise EngineError(f"the engine returned {type(output).__name__}, not a string")
            return output.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'

        return d.addBoth(stop_timer).addErrback(timed_out).addCallback(as_text)


def _capped(message: str, limit: int) -> str:
    """An error message as valid UTF-8 text of at most ``limit`` bytes: an engine's exception
    may carry anything, and it is stored and sent like output."""
    data = message.encode("utf-8", "replace")
    if len(data) > limit:
        data = data[:max(limit - 3, 0)] + b"..."
    return data.decode("utf-8", "ignore")
