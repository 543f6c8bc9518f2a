"""The reference worker: takes a circle's tasks from Redis and runs them with an engine.

It speaks the protocol of ``docs/worker-protocol.md`` (the Lua steps live in
:mod:`circles.backend.tasks`): BRPOP a task id from the circles' queues, CLAIM it (``pending`` ->
``processing``; expired or vanished tasks are skipped), run the script with an engine
(:mod:`circles.worker.engines`), FINISH it (``completed``/``error`` plus the reply on
``reply_to``, unless the server expired it meanwhile). The worker cancels the engine's Deferred
when the script timeout passes, and reports that with the task's ``reason`` ``timeout``
(:class:`~circles.worker.engines.ScriptTimedOut`), so the server answers -32003.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import (CancelledError, Deferred, DeferredList, DeferredSemaphore, ensureDeferred,
                                    maybeDeferred)
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from txredisapi import RedisError

from circles.backend import tasks
from circles.backend.redis import Reachability, RedisAddress, connect, reached, text
from circles.logs import Logger
from circles.worker.engines import (DEFAULT_MAX_OUTPUT, Engine, EngineError, OutputTooLarge, ScriptContext,
                                    ScriptTimedOut, output_size)

log = Logger()

POLL = 1  # seconds a BRPOP waits, so a stopping worker notices within a second
#: Seconds a finished task's result may wait for Redis to be back before it is given up.
RECORD_PATIENCE = 30.0


# -- the worker -------------------------------------------------------------------------------

class Worker(Service):
    """Serves the queues of ``circles``, at most ``concurrency`` scripts at a time.

    One blocking Redis connection waits for tasks (BRPOP over all the circles' queues, only
    while a slot is free, so a task is never held without being run) and one carries the other
    commands. Stopping lets running scripts finish (they are bounded by the script timeout).

    A script's output may be at most ``max_output`` bytes (UTF-8), or the task's ``max_output``
    (what the server can send back) if smaller; a larger one is an error result, never written.
    ``private_redis`` says that ``address`` is a server's private Redis (its ``--state-dir``), not
    a URL given, which is what a worker that cannot reach it is told to check.
    """

    def __init__(self, address: RedisAddress, circles: Sequence[str], engine: Engine, *, reactor,
                 prefix: str = tasks.DEFAULT_PREFIX, concurrency: int = 1, script_timeout: float = 30.0,
                 task_ttl: int = tasks.TASK_TTL, worker_id: Optional[str] = None,
                 max_output: int = DEFAULT_MAX_OUTPUT, private_redis: bool = False) -> None:
        if not circles:
            raise ValueError("a worker needs at least one circle")
        self.address = address
        self.private_redis = private_redis  # address is a server's private Redis (--state-dir), not a URL
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
                 worker=self.worker_id, n=len(self.circles), redis=self.address.where())
        watch = Reachability(self.address, self.reactor, private=self.private_redis)
        self._blocking = connect(self.address, self.reactor, watch=watch)
        self._commands = connect(self.address, self.reactor, reply_timeout=10.0, watch=watch)
        self._loop = ensureDeferred(self._take_tasks())

    def stopService(self) -> Deferred:
        """Stop taking tasks; fires once the running scripts finished and Redis is let go."""
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        if self._interruptible is not None:
            self._interruptible.cancel()
        if self._loop is not None:
            # A BRPOP in flight returns within POLL seconds; a task it brings is still run.
            await self._loop.addErrback(lambda f: f.trap(CancelledError))
        if self._running:
            log.info("waiting for {n} running script(s) to finish", n=len(self._running))
            await DeferredList(list(self._running), consumeErrors=True)
        factories = [f for f in (self._blocking, self._commands) if f is not None]
        self._blocking = self._commands = None
        await DeferredList([f.disconnect() for f in factories], consumeErrors=True)

    async def _interruptibly(self, d: Deferred) -> Any:
        self._interruptible = d
        try:
            return await d
        finally:
            self._interruptible = None

    async def _take_tasks(self) -> None:
        queues = list(self._queues)
        while self.running:
            await self._interruptibly(self._slots.acquire())
            if not self.running:
                self._slots.release()
                return
            try:
                # Both connections up before taking a task: one taken must be claimable.
                await self._interruptibly(self._commands.getConnection(peek=True))
                connection = await self._interruptibly(self._blocking.getConnection(peek=True))
                if not self._connected:
                    self._connected = True
                    log.info("connected to Redis at {redis}, waiting for tasks",
                             redis=reached(self.address, self._blocking))
                reply = await connection.brpop(queues, timeout=POLL)
            except CancelledError:
                self._slots.release()
                raise
            except RedisError as e:
                self._slots.release()
                if self._connected:
                    self._connected = False
                    log.warn("lost the connection to Redis at {redis} ({error}); reconnecting quietly",
                             redis=reached(self.address, self._blocking), error=str(e))
                continue
            queues.append(queues.pop(0))  # take turns between circles
            if not reply:
                self._slots.release()
                continue
            d = ensureDeferred(self._run_task(text(reply[1])))
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

    async def _run_task(self, task_id: str) -> None:
        key = tasks.task_key(self.prefix, task_id)
        now = self.reactor.seconds()
        try:
            fields = await self._eval(tasks.CLAIM, [key], [tasks.timestamp(now), self.worker_id])
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
        status, output, error, reason = tasks.COMPLETED, "", "", ""
        try:
            output = await self._execute(task.get("script", ""), context, timeout)
            size = output_size(output)
            if size > max_output:  # an engine that did not stop at the cap itself
                output = ""
                raise OutputTooLarge(max_output, size)
        except EngineError as e:
            status, error, reason = tasks.ERROR, _capped(str(e), max_output), e.reason
        except Exception as e:  # a bug in an --engine callable: its traceback is for debugging it
            log.debug("the engine raised on task {task}", task=task_id, log_failure=Failure())
            status, error = tasks.ERROR, _capped(f"{type(e).__name__}: {e}", max_output)
        duration = self.reactor.seconds() - now
        if status != tasks.COMPLETED:
            log.warn("task {task} for circle {circle} failed after {duration:.3f}s: {why}", task=task_id,
                     circle=context.circle, source=context.source, duration=duration, reason=reason or "error",
                     why=_summary(error, reason))
        reply_to = task.get("reply_to", "")
        keys = [key, reply_to] if reply_to else [key]
        outcome = tasks.Outcome(task_id, status, output, error, reason)
        written = await self._record(task_id, keys, [
            status, output, error, tasks.timestamp(self.reactor.seconds()), self.task_ttl,
            tasks.encode_reply(outcome), reason])
        if written is None:
            return
        if not written:
            log.info("task {task} expired while it ran; result dropped", task=task_id)
        log.debug("task {task} for circle {circle} ({source}): {outcome} in {duration:.3f}s", task=task_id,
                  circle=context.circle, source=context.source or "-", duration=duration,
                  outcome=(status if written else "expired") + (f" ({reason})" if reason else ""))

    async def _record(self, task_id: str, keys: list, args: list) -> Optional[int]:
        """FINISH the task; if Redis is away (a failover, a restart), again every half second
        for up to :data:`RECORD_PATIENCE` seconds while the worker runs, so that the result of a
        script that ran (a webhook event's, which nobody else waits for) is not dropped. FINISH
        writes only over ``processing``, so trying again never overwrites anything. None:
        not recorded."""
        give_up = self.reactor.seconds() + RECORD_PATIENCE
        while True:
            try:
                return await self._eval(tasks.FINISH, keys, args)
            except RedisError as e:
                if not self.running or self.reactor.seconds() >= give_up:
                    log.warn("could not record the result of task {task}: {error}", task=task_id, error=str(e))
                    return None
            await deferLater(self.reactor, 0.5, lambda: None)

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


def _summary(error: str, reason: str, limit: int = 200) -> str:
    """Why a task failed, for one log line: its ``reason`` if it has one, and the first line of
    its error (which the caller gets whole), at most ``limit`` characters."""
    lines = error.strip().splitlines()
    first = lines[0] if lines else "no error text"
    if len(first) > limit:
        first = first[:limit - 3] + "..."
    elif len(lines) > 1:
        first += f" (+{len(lines) - 1} more line{'' if len(lines) == 2 else 's'})"
    return f"{reason}: {first}" if reason else first


def _capped(message: str, limit: int) -> str:
    """An error message as valid UTF-8 text of at most ``limit`` bytes: an engine's exception
    may carry anything, and it is stored and sent like output."""
    data = message.encode("utf-8", "replace")
    if len(data) > limit:
        data = data[:max(limit - 3, 0)] + b"..."
    return data.decode("utf-8", "ignore")
