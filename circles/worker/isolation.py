"""Isolated engines: an ``--engine`` callable run in a pool of child processes.

An engine called in the worker's own process runs on its reactor: a script that computes for a
minute holds the worker for that minute. It answers no other task, its ``--script-timeout``
cannot fire (the timer needs the reactor) and it cannot shut down; a script that allocates
takes the worker's memory. No check inside an interpreter covers every engine, nor every bug
of one, so :class:`IsolatedEngine` (``--isolation process``, the default) runs the callable in
child processes (:mod:`circles.worker.engine_child`) and keeps the worker's reactor free:

- at the deadline the worker cancels the Deferred; the child is SIGKILLed, with its process
  group, and replaced: the timeout holds whatever the engine does;
- each child's address space is bounded (RLIMIT_AS: its size once the engine is loaded, plus
  ``max_memory``), and each script's CPU time too (RLIMIT_CPU, a backstop to the kill);
- children are started ahead (``start``, as many as the worker runs scripts at a time), so a
  task costs a round trip over a pipe, not a process start; a child is replaced after a script
  that failed other than by an :class:`EngineError` (an engine bug, memory, a crash, the
  deadline) and after ``tasks_per_child`` scripts;
- a script is sent to a child that is running one already, to start when that one ends, while
  that one has run for less than ``hold / 2`` and the child holds fewer than ``depth``: the
  scripts of a busy worker then run a few after each other in warm children instead of each
  waking a cold one (a wake-up of each side costs more than a small script, see
  docs/benchmarks.md). Scripts queued behind one that has run ``hold`` seconds are taken back
  (:data:`GIVE_BACK`, a signal the child answers at once with how many it started) and run in
  other children, so a long script holds no other; a script started is never run again: a child
  that dies or is killed had started none of those queued behind the one it ran;
- children get an allow-list of the worker's environment, not its secrets
  (:func:`~circles.worker.engines.passed_environment`), and each script a fresh directory;
- children die with the worker (``PR_SET_PDEATHSIG``, :func:`circles.common.children.dies_with_this_process`).

The cost, measured: docs/benchmarks.md ("Isolation").
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

import circles
from circles.common import fast_json
from circles.common.children import dies_with_this_process, how_it_ended
from circles.common.event_loop import TurnEnd
from circles.common.logs import Logger
from circles.common.once import Once
from circles.worker.engine_child import FRAME, encode_frame
from circles.worker.engines import (
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_OUTPUT,
    EngineError,
    OutputTooLarge,
    ScriptContext,
    ScriptTimedOut,
    passed_environment,
)

log = Logger()

#: Scripts a child runs before it is replaced (what an engine leaks, or a heap fragments, goes;
#: what a script allocates is bounded by RLIMIT_AS whatever the count). A start costs about 80 ms
#: of CPU (the child 60, its supervisor 18): 1.6 us on each script, where 10,000 cost 8 (2% of a
#: play's CPU end to end). At 800 scripts a second a busy child is replaced about once a minute.
TASKS_PER_CHILD = 50_000
#: Scripts a child holds at most: the one it runs and those queued behind it. Deeper, fewer
#: children wake for the same scripts (bench/isolation.py, 16 in flight over 16 children: the
#: children's CPU per script 66-68 us at 4, 53-59 at 8, 46-48 at 16 where the worker's own rose
#: from 20 to 28-31).
DEPTH = 8
#: Seconds a script may run with others queued behind it before they are taken back.
HOLD = 0.010
#: What the worker sends a child to take back the scripts it has not started (engine_child.py).
GIVE_BACK = signal.SIGUSR1
#: Seconds an idle child has to answer a take-back before it is replaced (an engine that
#: changed the signal's handler never answers: the child would be held out of use for good).
GIVE_BACK_PATIENCE = 1.0
#: Bytes a reply frame may have beyond the output cap (its header): a child sending more is killed.
HEADER_ROOM = 64 * 1024
STDERR_KEPT = 8192
#: Words in a dead child's stderr that say it ran out of memory (a C allocation failing hard).
OUT_OF_MEMORY_SIGNS = ("MemoryError", "Cannot allocate memory", "out of memory", "bad_alloc")


def _text(body: bytes) -> str:
    """A frame's text: UTF-8 with lone surrogates, as the child writes it (anything else replaced)."""
    try:
        return body.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return body.decode("utf-8", "replace")


def memory_error(limit: int | None) -> EngineError:
    return EngineError(f"script exceeded its memory limit ({limit} bytes)" if limit
                       else "script exceeded its memory limit")


_CONTEXT_FIELDS = tuple(field.name for field in attrs.fields(ScriptContext))


@attrs.define(eq=False)
class _Job:
    header: dict  # of its frame, but the child's epoch
    body: bytes  # the script
    done: Deferred
    limit: int  # the output cap of this script
    child: _Child | None = None
    cancelled: bool = False  # at its deadline while queued in a child: dropped when taken back


class _Child(ProcessProtocol):
    """One child process, from the pool's side: frames in and out, and how it ended."""
    transport: IProcessTransport  # set before any callback

    def __init__(self, pool: IsolatedEngine, home: str) -> None:
        self.pool = pool
        self.home = home  # private directory: its working directory, HOME, TMPDIR
        self.pid: int | None = None
        self.engine_pid: int | None = None  # the engine's process (its "ready" says), GIVE_BACK's
        self.pidfd: int | None = None  # of engine_pid, opened while it is surely that process
        self.ready = False
        self.killed = False  # by us: the deadline, a retirement, a stop
        self.jobs: deque[_Job] = deque()  # sent and not answered, in order: the first one runs
        self.head_since = 0.0  # when the first of jobs started (about: when it became the first)
        self.sent = 0  # task frames sent (those taken back not counted)
        self.tasks = 0  # scripts answered
        self.epoch = 0  # take-backs so far: a frame of an earlier epoch is dropped by the child
        self.giving_back = False  # GIVE_BACK sent, its answer not received yet
        self.retiring = False  # to be replaced once its scripts are answered: sent nothing more
        self.ended = Once()
        self._buffer = bytearray()
        self._stderr = bytearray()

    @property
    def job(self) -> _Job | None:
        """The script it runs (or will run first)."""
        return self.jobs[0] if self.jobs else None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # the supervisor's: the process group's id
        self.transport.write(encode_frame({"kind": "init", "spec": self.pool.spec, "path": self.pool.path,
                                           "max_memory": self.pool.max_memory}))

    def outReceived(self, data: bytes) -> None:
        if self.killed:
            return
        self._buffer += data
        while len(self._buffer) >= FRAME.size:
            header_size, body_size = FRAME.unpack_from(self._buffer)
            cap = (self.job.limit if self.job is not None else 0) + HEADER_ROOM
            if header_size + body_size > cap:
                self.pool._misbehaved(self, f"a reply of {header_size + body_size} bytes, more than {cap}")
                return
            end = FRAME.size + header_size + body_size
            if len(self._buffer) < end:
                return
            try:
                header = fast_json.loads(self._buffer[FRAME.size:FRAME.size + header_size])
            except ValueError:
                self.pool._misbehaved(self, "a reply that is not a frame")
                return
            body = bytes(self._buffer[FRAME.size + header_size:end])
            del self._buffer[:end]
            self.pool._received(self, header, body)
            if self.killed:
                return

    def send(self, frame: bytes) -> None:
        """Write ``frame`` to the child: at once when nothing is queued for it, else queued behind.

        Twisted's pipe writer queues every write: it stops watching the pipe for the close of its
        far end, watches it for room, writes on the next turn of the reactor, then watches for the
        close again, four ``epoll_ctl`` per script. Here the kernel takes the frame at once (a
        pipe holds 64 KiB) and the writer is left as it was; only what it did not take goes
        Twisted's way, behind which nothing is written out of order. A failed write (the child
        gone) leaves it to Twisted too, which reports it the usual way."""
        writer = getattr(self.transport, "pipes", {}).get(0)
        if (writer is not None and writer.connected and not writer.disconnecting and not writer._writeDisconnected
                and not writer.dataBuffer and not writer._tempDataBuffer):
            try:
                sent = os.write(writer.fd, frame)
            except OSError:
                sent = 0  # no room, or the child is gone
            if sent == len(frame):
                return
            frame = frame[sent:]
        self.transport.write(frame)

    def errReceived(self, data: bytes) -> None:
        self._stderr += data
        del self._stderr[:-STDERR_KEPT]

    def stderr_text(self) -> str:
        return self._stderr.decode("utf-8", "replace").strip()

    def kill(self) -> None:
        """SIGKILL the child and all its group (what an engine started too), and let go of it."""
        self.killed = True
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass  # not a group yet: the signal below ends the supervisor before it forked
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass  # gone already
        self.transport.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # nothing an engine started outlives its child
            except OSError:
                pass
        shutil.rmtree(self.home, ignore_errors=True)
        self.close_pidfd()
        self.pool._ended(self, reason)
        self.ended.fire(None)

    def open_pidfd(self) -> None:
        """A pidfd of the engine's process, so that a signal never reaches another process that
        got its pid once it ended (its supervisor reaps it, not us)."""
        if self.engine_pid is not None and hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(self.engine_pid)
            except OSError:
                self.pidfd = None  # gone already, or no pidfd here: os.kill then

    def close_pidfd(self) -> None:
        fd, self.pidfd = self.pidfd, None
        if fd is not None:
            os.close(fd)

    def signal_engine(self, number: int) -> None:
        """Send ``number`` to the engine's process (not its supervisor); OSError if it is gone."""
        if self.pidfd is not None:
            signal.pidfd_send_signal(self.pidfd, number)
        elif self.engine_pid is not None:
            os.kill(self.engine_pid, number)


class IsolatedEngine:
    """The engine ``spec`` (``package.module:callable``) run in up to ``size`` child processes:
    itself an engine, ``(script, context) -> Deferred[str]``.

    ``max_memory``: bytes a script may take, beyond the child's size once the engine is loaded
    (RLIMIT_AS), also given to the engine as ``context.max_memory`` when the worker gave none;
    None or 0: no limit. ``cpu_seconds``: CPU time a script may use (RLIMIT_CPU), a backstop to
    the kill at the deadline; None: none. ``env_names``: variables of the worker's environment
    the children see beyond :func:`~circles.worker.engines.passed_environment`'s. ``depth``:
    scripts a child may hold (1: one at a time); ``hold``: seconds a script may run with others
    queued behind it before they are taken back.

    Cancelling a call (the worker's timeout) kills its child: the Deferred fails with
    CancelledError, which the worker reports as the script's timeout. :meth:`start` starts the
    children ahead (else they start on first use); :meth:`stop` kills them all.
    """

    def __init__(self, spec: str, *, reactor: Any, size: int = 1, max_memory: int | None = DEFAULT_MAX_MEMORY,
                 cpu_seconds: float | None = None, max_output: int = DEFAULT_MAX_OUTPUT,
                 env_names: tuple[str, ...] | list[str] = (), tasks_per_child: int = TASKS_PER_CHILD,
                 depth: int = DEPTH, hold: float = HOLD) -> None:
        if size < 1:
            raise ValueError("an isolated engine needs at least one process")
        self.spec = spec
        self.reactor = reactor
        self.size = size
        self.max_memory = max_memory or None
        self.cpu_seconds = cpu_seconds
        self.max_output = max_output
        self.env_names = tuple(env_names)
        self.tasks_per_child = tasks_per_child
        self.depth = max(depth, 1)
        self.hold = hold
        self.path = [os.path.abspath(entry or os.curdir) for entry in sys.path]
        self._children: set[_Child] = set()  # alive and ours to use (not killed)
        self._free: deque[_Child] = deque()  # of those, the ones with no script (starting or ready)
        self._busy: set[_Child] = set()  # of those, the ones with scripts
        self._sweeping: Any = None  # the call of _sweep to come
        self._outgoing: dict[_Child, list[bytes]] | None = None  # frames for the end of this turn
        self._turn_end = TurnEnd(reactor)
        self._dying: set[_Child] = set()  # killed, not reaped yet
        self._queue: deque[_Job] = deque()
        self._warm = False  # keep `size` children started (after start())
        self._stopping = False
        self._shutdown_trigger: Any = None
        self._ready_waiters: list[Deferred] = []

    # -- the engine ---------------------------------------------------------------------------

    def __call__(self, script: str, context: ScriptContext) -> Deferred:
        if self._stopping:
            raise EngineError("the worker is stopping")
        limit = self.max_output if context.max_output is None else min(self.max_output, context.max_output)
        fields = {name: getattr(context, name) for name in _CONTEXT_FIELDS}
        fields["max_output"] = limit
        fields["max_memory"] = context.max_memory or self.max_memory
        header = {"kind": "task", "context": fields, "cpu": self.cpu_seconds}

        def cancel(d: Deferred) -> None:
            # Not answered: the Deferred fails with CancelledError, the worker's timeout.
            child = job.child
            if child is None:
                self._queue.remove(job)
            elif child.job is job:
                child.jobs.popleft()
                job.child = None
                log.debug("script stopped at its deadline: child {pid} killed", pid=child.pid)
                self._kill(child)
            else:
                job.cancelled = True  # queued behind another: taken back, it never starts
                self._give_back(child)

        job = _Job(header, script.encode("utf-8", "surrogatepass"), Deferred(cancel), limit)
        self._queue.append(job)
        self._dispatch()
        return job.done

    def pids(self) -> list[int]:
        """The process ids of the children in use (each the leader of its process group)."""
        return sorted(child.pid for child in self._children if child.pid is not None)

    def start(self) -> Deferred:
        """Start ``size`` children now, and replace each that goes; fires once all are ready."""
        self._stopping = False
        self._warm = True
        self._watch_shutdown()
        while len(self._children) < self.size:
            self._spawn()
        return self.ready()

    def ready(self) -> Deferred:
        """Fires once ``size`` children are started and ready (after :meth:`start`)."""
        if self._all_ready():
            return succeed(None)
        d: Deferred = Deferred()
        self._ready_waiters.append(d)
        return d

    def stop(self) -> Deferred:
        """Kill every child (a script running fails); fires once all have ended."""
        self._stopping = True
        self._warm = False
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass  # it is firing now: this is that trigger's call
        if self._sweeping is not None and self._sweeping.active():
            self._sweeping.cancel()
        self._sweeping = None
        queued, self._queue = self._queue, deque()
        for child in list(self._children):
            jobs, child.jobs = child.jobs, deque()
            self._kill(child)
            for index, job in enumerate(jobs):
                job.child = None
                if job.cancelled:
                    continue
                if index == 0:
                    job.done.errback(EngineError("the worker stopped while the script ran"))
                else:
                    queued.append(job)  # it had not started
        for job in queued:
            job.done.errback(EngineError("the worker is stopping"))
        self._fail_ready(EngineError("the worker is stopping"))
        return DeferredList([child.ended.when() for child in self._dying]).addCallback(lambda _: None)

    def _watch_shutdown(self) -> None:
        if self._shutdown_trigger is None:
            # After the worker stopped (its "before" trigger), should nobody have stopped us.
            self._shutdown_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def _spawn(self) -> _Child:
        home = tempfile.mkdtemp(prefix="circles-engine-")  # mode 0700
        child = _Child(self, home)
        env = passed_environment(self.env_names)
        env["HOME"] = env["TMPDIR"] = home
        # Where this package is, so `-m` finds it whatever the worker's own path was.
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(circles.__file__)))
        argv = dies_with_this_process([sys.executable, "-m", "circles.worker.engine_child"], supervise=True,
                                      batch=True)
        try:
            self.reactor.spawnProcess(child, argv[0], argv, env=env, path=home,
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except Exception:
            shutil.rmtree(home, ignore_errors=True)
            raise
        self._children.add(child)
        self._free.append(child)
        self._watch_shutdown()
        return child

    def _dispatch(self) -> None:
        while self._queue and not self._stopping:
            child = self._behind_a_short_one() or self._idle()
            if child is None:
                return
            self._send(child, self._queue.popleft())

    def _behind_a_short_one(self) -> _Child | None:
        """A child running a script that started less than ``hold / 2`` ago, holding fewer than
        ``depth``: of those, the one holding the fewest."""
        if self.depth < 2:
            return None
        recent = self.reactor.seconds() - self.hold / 2
        best = None
        for child in self._busy:
            if (len(child.jobs) < self.depth and child.head_since > recent and not child.giving_back
                    and not child.retiring and (best is None or len(child.jobs) < len(best.jobs))):
                best = child
        return best

    def _idle(self) -> _Child | None:
        """A child holding no script: started already if any is, else a new one."""
        if self._free:
            return self._take_free()
        while len(self._children) < self.size and self._queue:
            try:
                child = self._spawn()
            except Exception as e:  # (no fork, no fd): the script waiting first fails, the next tries again
                self._queue.popleft().done.errback(EngineError(f"cannot start the engine's process: {e}"))
                continue
            self._free.remove(child)
            return child
        return None

    def _send(self, child: _Child, job: _Job) -> None:
        job.child = child
        if not child.jobs:
            child.head_since = self.reactor.seconds()
            self._busy.add(child)
        child.jobs.append(job)
        child.sent += 1
        if child.sent >= self.tasks_per_child:
            child.retiring = True
        if len(child.jobs) == 2:
            self._sweep_later()
        frame = encode_frame(dict(job.header, epoch=child.epoch), job.body)
        if self._outgoing is None:
            self._outgoing = {}
            self._turn_end.callLater(0, self._write_out)
        self._outgoing.setdefault(child, []).append(frame)

    def _write_out(self) -> None:
        """Write the frames of this turn of the reactor, each child's in one write: a child woken
        by the first of several reads them all at once (its script starts in the next turn)."""
        outgoing, self._outgoing = self._outgoing or {}, None
        for child, frames in outgoing.items():
            if not child.killed:  # (a child killed meanwhile: its scripts were queued again)
                child.send(frames[0] if len(frames) == 1 else b"".join(frames))

    def _take_free(self) -> _Child:
        """The ready child that ran a script last (its memory is warm in the caches), else the
        first one still starting."""
        for index in range(len(self._free) - 1, -1, -1):
            if self._free[index].ready:
                child = self._free[index]
                del self._free[index]
                return child
        return self._free.popleft()

    # -- taking back what waits behind a long script --------------------------------------------------

    def _sweep_later(self) -> None:
        if self._sweeping is None and not self._stopping:
            self._sweeping = self.reactor.callLater(self.hold, self._sweep)

    def _sweep(self) -> None:
        """Take back the scripts queued behind one that has run ``hold`` seconds."""
        self._sweeping = None
        late = self.reactor.seconds() - self.hold
        waiting = False
        for child in list(self._busy):
            if len(child.jobs) > 1 and not child.giving_back:
                if child.head_since <= late:
                    self._give_back(child)
                else:
                    waiting = True
        if waiting:
            self._sweep_later()

    def _give_back(self, child: _Child) -> None:
        """Ask ``child`` for the scripts it has not started (it answers "returned")."""
        if child.giving_back or child.killed or child.engine_pid is None:
            return
        child.giving_back = True
        child.epoch += 1
        try:
            child.signal_engine(GIVE_BACK)
        except OSError:
            pass  # it is gone: its end hands them back (_ended)

    def _taken_back(self, child: _Child, started: int) -> None:
        """``child`` started ``started`` scripts in all: the ones it holds beyond those come back
        to the queue, first, in their order (those cancelled meanwhile go)."""
        child.giving_back = False
        running = max(started - child.tasks, 0)  # 1 if it runs one now, else 0
        returned = list(child.jobs)[running:]
        for _ in returned:
            child.jobs.pop()
        child.sent = started
        child.retiring = started >= self.tasks_per_child
        self._requeue(returned)
        if not child.jobs:
            self._idle_again(child)
        elif child.jobs[0].cancelled:
            self._kill(child)  # past that script's deadline already: it started before its take-back
            return
        self._dispatch()

    def _requeue(self, jobs: list[_Job]) -> None:
        """Scripts a child had not started, back at the head of the queue in their order."""
        for job in reversed(jobs):
            job.child = None
            if not job.cancelled:
                self._queue.appendleft(job)

    def _idle_again(self, child: _Child) -> None:
        """``child`` holds no script now: free to take the next (once it answered a take-back:
        until then what it is sent might be counted on neither side), or replaced if retiring."""
        self._busy.discard(child)
        if child.giving_back:
            # _taken_back comes back here; a child that never answers is replaced.
            self.reactor.callLater(GIVE_BACK_PATIENCE, self._unanswered, child, child.epoch)
            return
        if child.retiring:
            self._kill(child)
        elif child not in self._free:
            self._free.append(child)

    def _unanswered(self, child: _Child, epoch: int) -> None:
        if child.giving_back and child.epoch == epoch and not child.jobs and not child.killed:
            log.warn("engine child {pid} did not answer a take-back ({signal}): replaced", pid=child.pid,
                     signal=signal.Signals(GIVE_BACK).name)
            self._kill(child)

    # -- children ending --------------------------------------------------------------------------

    def _kill(self, child: _Child, error: Exception | None = None) -> None:
        """Kill ``child`` and start another in its place (when warm). What it held beyond the
        script it ran (removed already) had not started: queued again, or failed with ``error``."""
        self._children.discard(child)
        self._busy.discard(child)
        if child in self._free:
            self._free.remove(child)
        held, child.jobs = list(child.jobs), deque()
        self._dying.add(child)
        child.kill()
        if error is None:
            self._requeue(held)
        else:
            for job in held:
                job.child = None
                if not job.cancelled:
                    job.done.errback(error)
        self._replace()
        self._dispatch()

    def _replace(self) -> None:
        """Start a child in place of one gone, when children are kept started (after start())."""
        if self._warm and not self._stopping and len(self._children) < self.size:
            try:
                self._spawn()
            except Exception as e:  # (no fork, no fd): the next script tries again
                log.error("cannot start an engine process: {error}", error=str(e))

    def _finish(self, child: _Child, result: Any, retire: bool = False, error: Exception | None = None) -> None:
        """``child``'s script ended with ``result`` (a string or an exception). ``retire``: the
        child is replaced; it started no script after this one (engine_child.py), so those it held
        are queued again, unless ``error`` says they fail with it."""
        job = child.jobs.popleft() if child.jobs else None
        child.tasks += 1
        child.head_since = self.reactor.seconds()
        if retire:
            self._kill(child, error)
        elif not child.jobs:
            self._idle_again(child)
            self._dispatch()
        elif child.jobs[0].cancelled and not child.giving_back:
            self._kill(child)  # the next would start past its deadline (not asked back: the sweep's race)
        else:
            self._dispatch()
        if job is not None and not job.cancelled:
            job.child = None
            if isinstance(result, BaseException):
                job.done.errback(result)
            else:
                job.done.callback(result)

    def _received(self, child: _Child, header: dict, body: bytes) -> None:
        kind = header.get("kind")
        if kind == "ready" and not child.ready:
            child.ready = True
            child.engine_pid = header.get("pid") if isinstance(header.get("pid"), int) else None
            child.open_pidfd()
            log.debug("engine child {pid} ready: {baseline} bytes, limit {limit}", pid=child.pid,
                      baseline=header.get("baseline"), limit=header.get("limit"))
            if self._all_ready():
                waiters, self._ready_waiters = self._ready_waiters, []
                for d in waiters:
                    d.callback(None)
            return
        if kind == "failed":
            reason = body.decode("utf-8", "replace")
            log.error("the engine's process cannot load {spec}: {reason}", spec=self.spec, reason=reason)
            self._warm = False  # no use starting it again and again: on demand only
            error = EngineError(f"the engine cannot be loaded: {reason}")
            self._fail_ready(error)
            self._finish(child, error, retire=True, error=error)
            return
        if kind == "returned" and child.giving_back and isinstance(header.get("started"), int):
            self._taken_back(child, header["started"])
            return
        if child.job is None or not child.ready:
            self._misbehaved(child, f"an unexpected {kind!r} reply")
            return
        if kind == "done":
            self._finish(child, _text(body))
            return
        if kind != "error":
            self._misbehaved(child, f"an unknown {kind!r} reply")
            return
        message = _text(body)
        kind = header.get("type")
        if kind == "memory":
            self._finish(child, memory_error(self.max_memory), retire=True)
        elif kind == "exception":
            log.debug("the engine raised in child {pid}: {traceback}", pid=child.pid,
                      traceback=header.get("traceback", ""))
            self._finish(child, EngineError(f"{header.get('name', 'Exception')}: {message}"), retire=True)
        elif header.get("limit") is not None:
            self._finish(child, OutputTooLarge(header["limit"], header.get("size")))
        elif header.get("reason") == ScriptTimedOut.reason:
            self._finish(child, ScriptTimedOut(message))
        else:
            printed = header.get("output")
            if isinstance(printed, int) and 0 < printed <= len(body):  # the body ends with the output printed first
                message, output = _text(body[:-printed]), _text(body[-printed:])
            else:
                output = ""
            error = EngineError(message)
            error.output = output
            if header.get("reason"):
                error.reason = header["reason"]
            self._finish(child, error)

    def _misbehaved(self, child: _Child, what: str) -> None:
        """Killed: what it held fails too (it may have started the next one: nothing says)."""
        log.warn("engine child {pid} sent {what}: killed", pid=child.pid, what=what)
        job = child.job
        error = EngineError(f"the engine's process failed: it sent {what}")
        if job is not None and what.startswith("a reply of"):
            self._finish(child, OutputTooLarge(job.limit), retire=True, error=error)
        else:
            self._finish(child, error, retire=True, error=error)

    def _ended(self, child: _Child, reason: Failure) -> None:
        self._dying.discard(child)
        if child.killed:
            return
        # It ended by itself: a crash, RLIMIT_CPU, the kernel's OOM killer, an engine's exit.
        how = how_it_ended(reason)
        detail = child.stderr_text()
        job = child.job
        log.warn("engine child {pid} ended by itself ({how}){during}{detail}", pid=child.pid, how=how,
                 during=" running a script" if job is not None else "",
                 detail=(": " + detail.splitlines()[-1]) if detail else "")
        self._children.discard(child)
        self._busy.discard(child)
        if child in self._free:
            self._free.remove(child)
        if job is None and not child.ready:
            self._warm = False  # it cannot even start: on demand only, so no loop of restarts
            self._fail_ready(EngineError(f"the engine's process could not start ({how})"))
        error: Exception
        if reason.value.signal == signal.SIGXCPU:  # type: ignore[union-attr]  # ProcessDone or ProcessTerminated
            error = ScriptTimedOut(f"script used more than {math.ceil(self.cpu_seconds or 0)}s of CPU")
        elif any(sign in detail for sign in OUT_OF_MEMORY_SIGNS):
            error = memory_error(self.max_memory)
        elif not child.ready:
            error = EngineError(f"the engine's process could not start ({how})"
                                + (f": {detail.splitlines()[-1]}" if detail else ""))
        else:
            error = EngineError(f"the engine's process died running the script ({how})")
        child.killed = True
        held, child.jobs = list(child.jobs), deque()
        if job is not None:
            held.pop(0)
        self._requeue(held)  # the ones behind the one it ran had not started
        self._replace()
        self._dispatch()
        if job is not None and not job.cancelled:
            job.child = None
            job.done.errback(error)
        elif not child.ready:
            # Scripts waiting for a child that will never come: they fail the same way.
            while self._queue and not self._children:
                self._queue.popleft().done.errback(error)

    def _fail_ready(self, error: Exception) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(error)

    def _all_ready(self) -> bool:
        return len(self._children) >= self.size and all(child.ready for child in self._children)
