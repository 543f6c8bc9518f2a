"""The reference worker: takes a circle's tasks from Redis and runs them with an engine.

It speaks the protocol of ``docs/worker-protocol.md`` (the Lua steps live in
:mod:`circles.backend.tasks`): register and HEARTBEAT, BLMOVE a task id from a circle's queue
into this worker's processing list, CLAIM it (``pending`` -> ``processing``; expired or
vanished tasks are skipped), run the script with an engine (:mod:`circles.worker.engines`),
FINISH it (``completed``/``error`` plus the reply on ``reply_to``, unless it is no longer this
worker's). The worker cancels the engine's Deferred when the script timeout passes, and reports
that with the task's ``reason`` ``timeout`` (:class:`~circles.worker.engines.ScriptTimedOut`), so
the server answers -32003. Each heartbeat also reaps the workers whose heartbeat lapsed
(``REAP``): their webhook tasks run again here or elsewhere, their plays are answered.

A circle's init script (``-k PK:FILE``, :mod:`circles.backend.init_scripts`) is claimed before
the worker's first heartbeat and, if this worker got it, run here before the circle's tasks.
"""

from __future__ import annotations

import os
import secrets
import socket
import unicodedata
from collections.abc import Sequence
from typing import Any, NamedTuple

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from txredisapi import RedisError, ResponseError

from circles.backend import init_scripts, tasks
from circles.backend.admin import reap
from circles.backend.init_scripts import InitScript, claim_ttl, once_key, stamp
from circles.backend.job_schema import STOPPED
from circles.backend.reachability import Reachability
from circles.backend.redis import connect, reached
from circles.backend.redis_url import RedisAddress
from circles.backend.scripts import SOURCE_INIT
from circles.backend.txredisapi_patches import drop_connections, live_connection
from circles.backend.values import text
from circles.common.event_loop import TurnEnd
from circles.common.log_budget import LogBudget
from circles.common.logs import Logger
from circles.common.logs import enabled as log_enabled
from circles.common.once import Once
from circles.worker.engines import (
    DEFAULT_MAX_OUTPUT,
    Engine,
    EngineError,
    OutputTooLarge,
    ScriptContext,
    ScriptTimedOut,
    output_before_error,
    output_size,
)

log = Logger()

POLL = 1  # seconds a BLMOVE waits, so a stopping worker notices within a second
#: Seconds between the reads of the statuses of the tasks running here.
STATUS_CHECK = 1.0
#: Seconds a task taken, or a result, may wait for Redis to be back before it is given up.
RECORD_PATIENCE = 30.0
#: Failed scripts logged one by one per minute; the rest are counted, by caller, in one line.
FAILURES_SHOWN = 20


# -- the worker -------------------------------------------------------------------------------

class TaskStopped(EngineError):
    """The task was no longer this worker's to run (expired by the server, stopped, reaped)
    while its script ran: the script was killed, as its timeout would have."""

    reason = STOPPED


class _Finish(NamedTuple):
    """A task's result waiting for this turn's FINISH_MANY (:meth:`Worker._finished`)."""

    task_id: str
    keys: list
    args: list
    recorded: Deferred  # fired once it is recorded
    outcome: tasks.Outcome
    context: ScriptContext
    duration: float


class Worker(Service):
    """Serves the queues of ``circles``, at most ``concurrency`` scripts at a time.

    One blocking Redis connection per circle waits for tasks (BLMOVE from the circle's queue into
    this worker's processing list, only while a slot is free, so a task is never held without
    being run: one taken when the last slot went to another circle meanwhile is handed back) and
    one carries the other commands, the heartbeat among them: every ``heartbeat`` seconds the
    worker says it is live for ``worker_ttl`` seconds more, and reaps the workers that stopped
    saying so. Stopping (SIGTERM) drains: no task is taken from then on (one a waiting BLMOVE
    brings goes back first on its queue), the running scripts finish (bounded by the script
    timeout) and their results are recorded and delivered, heartbeats go on meanwhile (so none is
    reaped), then the worker deregisters.

    A script's output may be at most ``max_output`` bytes (UTF-8), or the task's ``max_output``
    (what the server can send back) if smaller; a larger one is an error result, never written.
    ``private_redis`` says that ``address`` is a server's private Redis (its ``--state-dir``), not
    a URL given, which is what a worker that cannot reach it is told to check.

    ``init_scripts`` (at most one per circle, of ``circles``): each is claimed in Redis
    (:data:`~circles.backend.init_scripts.CLAIM`) on the connection of the first heartbeat,
    before it, so that no server sees this worker live and queues the script first. If this
    worker got the claim, it runs the script itself (caller: the circle; source ``init``; in a
    slot, as a task) and takes that circle's tasks once it ended; if the script ran (or runs)
    elsewhere already, it takes them at once.
    """

    def __init__(self, address: RedisAddress, circles: Sequence[str], engine: Engine, *, reactor,
                 prefix: str = tasks.DEFAULT_PREFIX, concurrency: int = 1, script_timeout: float = 30.0,
                 task_ttl: int = tasks.TASK_TTL, worker_id: str | None = None,
                 max_output: int = DEFAULT_MAX_OUTPUT, private_redis: bool = False,
                 heartbeat: float = tasks.HEARTBEAT_INTERVAL, worker_ttl: float = tasks.WORKER_TTL,
                 init_scripts: Sequence[InitScript] = ()) -> None:
        if not circles:
            raise ValueError("a worker needs at least one circle")
        if any(init.circle not in circles for init in init_scripts):
            raise ValueError("an init script is for a circle the worker does not serve")
        if len({init.circle for init in init_scripts}) < len(init_scripts):
            raise ValueError("a circle may have one init script")
        if not worker_ttl > heartbeat > 0:
            raise ValueError("the worker TTL must be longer than the heartbeat interval")
        self.address = address
        self.private_redis = private_redis  # address is a server's private Redis (--state-dir), not a URL
        self.circles = list(circles)
        self.engine = engine
        self.reactor = reactor
        self._turn_end = TurnEnd(reactor)  # results recorded at the end of the turn that got them
        self.prefix = prefix
        self.concurrency = concurrency
        self.script_timeout = script_timeout
        self.task_ttl = task_ttl
        self.max_output = max_output
        self.heartbeat = heartbeat
        self.worker_ttl = worker_ttl
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._processing = tasks.processing_key(prefix, self.worker_id)
        self._registry = tasks.workers_key(prefix)
        self._presence = [self._registry] + [tasks.circle_workers_key(prefix, c) for c in self.circles]
        self._free = concurrency  # slots free
        self._slot_waiters: list[Deferred] = []
        self._running: set[Deferred] = set()
        self._held: set[str] = set()  # the tasks this worker runs (or claims), by id
        self._results: list[_Finish] = []  # FINISHes for the end of this turn
        # What this worker's processing list holds and nothing here runs is adopted at the start (a
        # worker of the same id before it) and after a lost connection (a reply lost with it).
        self._adopt_needed = True
        self._backlog = set(self.circles)  # circles whose queue may hold tasks: TAKE before BLMOVE
        self._blocking: dict[str, Any] = {}  # circle -> its txredisapi factory (one BLMOVE connection)
        self._commands: Any = None
        self._loops: list[Deferred] = []
        self._interruptible: set[Deferred] = set()  # what the loops wait on that stopping may cancel
        self._connected = False
        self._beats: LoopingCall | None = None
        self._beating = False  # a heartbeat (and its reaping) is in flight
        self.registered = False  # a heartbeat was answered (and the worker not found reaped since)
        self._beat_failed = False  # the last heartbeat failed: the next goes out as soon as Redis is back
        self._registered_waiters: list[Deferred] = []
        self.reaped = 0  # dead workers reaped by this one
        self.init_scripts = {init.circle: init for init in init_scripts}
        self._unclaimed = list(init_scripts)  # init scripts to claim with the next heartbeat
        self._inits_ended = {init.circle: Once() for init in init_scripts}  # the circle's tasks wait for it
        self._init_token = ""  # what a claim of this worker says (fixed at its first)
        self.failures = LogBudget(reactor, "failed scripts", FAILURES_SHOWN, level=LogLevel.warn, peers="callers",
                                  logger=log)
        self._executions: dict[str, Deferred] = {}  # task id -> its script running here
        self._stopping: set[str] = set()  # tasks being stopped here (their timeout is a stop)
        self._checks: LoopingCall | None = None
        self._checking = False
        self.stopped_tasks = 0  # scripts killed here because their task was no longer this worker's to run

    def startService(self) -> None:
        super().startService()
        log.info("worker {worker} serving {n} circle(s) through Redis at {redis}",
                 worker=self.worker_id, n=len(self.circles), redis=self.address.where())
        watch = Reachability(self.address, self.reactor, private=self.private_redis)
        self._commands = connect(self.address, self.reactor, reply_timeout=10.0, watch=watch)
        self._blocking = {circle: connect(self.address, self.reactor, watch=watch) for circle in self.circles}
        self._beats = LoopingCall(self._beat)
        self._beats.clock = self.reactor
        self._beats.start(self.heartbeat, now=True)
        self._loops = [ensureDeferred(self._take_tasks(circle)).addErrback(self._loop_failed, circle)
                       for circle in self.circles]
        self._start_checks()

    def _start_checks(self) -> None:
        self._checks = LoopingCall(self._check)
        self._checks.clock = self.reactor
        self._checks.start(STATUS_CHECK, now=False)

    def stopService(self) -> Deferred:
        """Stop taking tasks; fires once the running scripts finished, the worker deregistered
        and Redis is let go."""
        return ensureDeferred(self._stop())

    def _loop_failed(self, failure: Failure, circle: str) -> Failure | None:
        """A bug that ended a circle's loop is said, not left in a Deferred nobody reads."""
        if failure.check(CancelledError):
            return failure
        log.failure("taking the tasks of circle {circle} (no more are taken here)", failure, circle=circle)
        return None

    async def _stop(self) -> None:
        Service.stopService(self)
        for d in list(self._interruptible):
            d.cancel()
        for d in self._registered_waiters + self._slot_waiters:
            if not d.called:
                d.cancel()
        # A BLMOVE in flight returns within POLL seconds; a task it brings is handed back.
        await DeferredList([loop.addErrback(lambda f: f.trap(CancelledError)) for loop in self._loops],
                           consumeErrors=True)
        if self._running:
            log.info("waiting for {n} running script(s) to finish", n=len(self._running))
            await DeferredList(list(self._running), consumeErrors=True)
        if self._beats is not None and self._beats.running:
            self._beats.stop()  # heartbeats went on while scripts finished: none was reaped
        if self._checks is not None and self._checks.running:
            self._checks.stop()
        await self._deregister()
        self.failures.stop()
        factories = [f for f in [self._commands, *self._blocking.values()] if f is not None]
        self._blocking, self._commands = {}, None
        await DeferredList([f.disconnect() for f in factories], consumeErrors=True)

    async def _deregister(self) -> None:
        """Leave the circles' live workers and the registry; whatever the processing list still
        holds (a task taken as the worker stopped) goes back to its queue (REAP, forced)."""
        try:
            await self._eval(tasks.DEREGISTER, self._presence, [self.worker_id])
            await self._eval(tasks.REAP, [self._registry, self._processing, tasks.dead_key(self.prefix)],
                             [self.prefix, self.worker_id, "1", tasks.STATUS_TTL, self.task_ttl])
            log.info("worker {worker} deregistered", worker=self.worker_id)
        except RedisError as e:
            log.warn("could not deregister worker {worker} ({error}): other workers reap it once its heartbeat "
                     "lapses", worker=self.worker_id, error=str(e))

    # -- heartbeat and reaping --------------------------------------------------------------------

    def _beat(self) -> None:
        if self._beating:
            return  # one at a time: never pile heartbeats up behind a slow Redis
        self._beating = True  # (and on while stopping: running scripts must not be reaped)
        ensureDeferred(self._beat_once())

    async def _beat_once(self) -> None:
        try:
            try:
                await self._heartbeat()
            except (RedisError, CancelledError) as e:
                self._heartbeat_failed(e)
        except Exception:
            log.failure("heartbeat")
        finally:
            self._beating = False

    def _heartbeat_failed(self, error: Exception) -> None:
        self._beat_failed = True
        if isinstance(error, ResponseError) and str(error).startswith("READONLY") and self.address.sentinels:
            # A primary demoted by a failover whose connections were not closed: reconnect, to
            # the primary the Sentinels name now (the server does the same on ROLE).
            log.warn("Redis at {redis} is no longer the primary: reconnecting",
                     redis=reached(self.address, self._commands))
            for factory in [self._commands, *self._blocking.values()]:
                drop_connections(factory)

    async def _heartbeat(self) -> None:
        if self._commands is None:
            return
        if not self.registered or self._beat_failed:
            # The first heartbeat, and the first after a failed one, go out as soon as Redis is
            # reached: until then, plays to the circle are refused (no live worker), and after
            # the worker's TTL it is reaped.
            # On that connection itself: txredisapi wakes this waiter before it adds the
            # connection to the pool, so the pool is still empty at this point.
            connection = await self._commands.getConnection(peek=True)
            # The init scripts' claims go first, on the same connection: Redis has them before any
            # server can see this worker live (and queue an init script itself).
            self._claim_init_scripts(connection)
            beat = connection.eval(tasks.HEARTBEAT, self._presence, [self.worker_id, self.worker_ttl])
        else:
            if self._unclaimed:
                self._claim_init_scripts(self._commands.handler)
            beat = self._eval(tasks.HEARTBEAT, self._presence, [self.worker_id, self.worker_ttl])
        new = int(await beat)
        if new and self.registered:
            log.warn("worker {worker} was no longer registered in Redis (given up for lost after {ttl}s without a "
                     "heartbeat, or Redis lost its data): registered again", worker=self.worker_id, ttl=self.worker_ttl)
        self.registered, self._beat_failed = True, False
        waiters, self._registered_waiters = self._registered_waiters, []
        for d in waiters:
            d.callback(None)
        await reap(self._commands.handler, self.prefix, skip=self.worker_id, counter=self)

    # -- init scripts -------------------------------------------------------------------------------

    def _claim_init_scripts(self, connection: Any) -> None:
        """Send the claims of the init scripts not claimed yet on ``connection``, now; each is
        run (or not) as its answer comes."""
        inits, self._unclaimed = self._unclaimed, []
        if not inits:
            return
        if not self._init_token:
            self._init_token = f"running: worker {self.worker_id} since {stamp(self.reactor)}"
        for init in inits:
            claim = maybeDeferred(connection.eval, init_scripts.CLAIM, [once_key(self.prefix, init)],
                                  [self._init_token, claim_ttl(self.script_timeout)])
            self._start_init(init, claim)

    def _start_init(self, init: InitScript, claim: Deferred) -> None:
        """Run ``init`` as ``claim`` says, as one of the worker's running scripts (a stop waits for it)."""
        d = ensureDeferred(self._init(init, claim))
        self._running.add(d)
        d.addBoth(self._init_done, d, init)

    def _init_done(self, result, d: Deferred, init: InitScript) -> None:
        self._running.discard(d)
        if isinstance(result, Failure):
            log.failure("running the init script of circle {circle}", result, circle=init.circle)
            if not self._inits_ended[init.circle].fired:
                self._inits_ended[init.circle].fire(None)  # never hold the circle's tasks for a bug

    async def _init(self, init: InitScript, claim: Deferred) -> None:
        key = once_key(self.prefix, init)
        ended = self._inits_ended[init.circle]
        try:
            claimed, held = await claim
        except RedisError as e:
            self._unclaimed.append(init)  # with the next heartbeat that reaches Redis
            log.warn("init script {path} of circle {circle}: could not claim it ({error}); tried again once Redis "
                     "is back", path=init.path, circle=init.circle, error=str(e))
            return
        if not int(claimed):
            log.info("init script {path} of circle {circle}: not run by this worker ({key}: {held})",
                     path=init.path, circle=init.circle, key=key, held=text(held))
            ended.fire(None)
            return
        try:
            while self._free <= 0:  # a slot, as a task takes one
                await self._interruptibly(self._when_free())
        except CancelledError:
            pass
        if not self.running:
            await self._give_init_back(key)
            log.info("init script {path} of circle {circle}: not run, the worker is stopping; it runs at the next "
                     "start", path=init.path, circle=init.circle)
            ended.fire(None)
            return
        self._free -= 1
        try:
            await self._run_init(init, key)
        finally:
            self._release()
            ended.fire(None)

    async def _run_init(self, init: InitScript, key: str) -> None:
        context = ScriptContext(task_id=f"init-{init.digest[:16]}", circle=init.circle, caller=init.circle,
                                source=SOURCE_INIT, max_output=self.max_output)
        log.info("init script {path} of circle {circle}: running it", path=init.path, circle=init.circle)
        try:
            output = await self._execute(init.script, context, self.script_timeout)
            if output_size(output) > self.max_output:
                raise OutputTooLarge(self.max_output, output_size(output))
        except Exception as e:
            detail = str(e) if isinstance(e, EngineError) else f"{type(e).__name__}: {e}"
            await self._give_init_back(key)
            init_scripts.failed(init, getattr(e, "reason", "") or "error", detail, getattr(e, "output", "") or "")
            return
        await init_scripts.ran(self._eval, init, key, self._init_token,
                               f"completed: worker {self.worker_id} at {stamp(self.reactor)}", output)

    async def _give_init_back(self, key: str) -> None:
        await init_scripts.give_back(self._eval, key, self._init_token)

    def _when_registered(self) -> Deferred:
        if self.registered:
            return succeed(None)
        d: Deferred = Deferred()
        self._registered_waiters.append(d)
        return d

    # -- slots --------------------------------------------------------------------------------------

    def _when_free(self) -> Deferred:
        """Fires once a slot is free (without taking it)."""
        if self._free > 0:
            return succeed(None)
        d: Deferred = Deferred()
        self._slot_waiters.append(d)
        return d

    def _release(self, slots: int = 1) -> None:
        self._free += slots
        waiters, self._slot_waiters = self._slot_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    # -- taking tasks -------------------------------------------------------------------------------

    async def _interruptibly(self, d: Deferred) -> Any:
        self._interruptible.add(d)
        try:
            return await d
        finally:
            self._interruptible.discard(d)

    async def _take_tasks(self, circle: str) -> None:
        queue = tasks.queue_key(self.prefix, circle)
        factory = self._blocking[circle]
        while self.running:
            if self._free <= 0:
                await self._interruptibly(self._when_free())
                # The slots that free up in the same turn of the reactor (the replies of several
                # scripts read at once) are taken together, in one TAKE.
                await self._interruptibly(deferLater(self._turn_end, 0, lambda: None))
            await self._interruptibly(self._when_registered())  # never hold a task unregistered
            if circle in self._inits_ended:  # the circle's init script first
                await self._interruptibly(self._inits_ended[circle].when())
            if not self.running:
                return
            try:
                # Both connections up before taking a task: one taken must be claimable.
                await self._interruptibly(self._commands.getConnection(peek=True))
                connection = await self._interruptibly(factory.getConnection(peek=True))
                if not self._connected:
                    self._connected = True
                    log.info("connected to Redis at {redis}, waiting for tasks", redis=reached(self.address, factory))
                if self._adopt_needed:
                    await self._adopt()
                if self._free <= 0 or not self.running:
                    continue  # another circle's loop took the last slot meanwhile, or stopping
                if circle in self._backlog and await self._take_waiting(circle, queue):
                    continue
                if self._free <= 0 or not self.running:
                    continue
                reply = await connection.execute_command("BLMOVE", queue, self._processing, "RIGHT", "LEFT", POLL,
                                                         apply_timeout=False)
            except RedisError as e:
                # A reply lost with the connection may have moved tasks into the processing list
                # that nothing here runs: adopted once Redis is back.
                self._adopt_needed = True
                if self._connected:
                    self._connected = False
                    log.warn("lost the connection to Redis at {redis} ({error}); reconnecting quietly",
                             redis=reached(self.address, factory), error=str(e))
                continue
            if not reply:
                continue
            task_id = text(reply)
            if not self.running:
                # Taken by a BLMOVE that was waiting as the worker began to stop: a stopping worker
                # takes no new task. First on its queue again, for another worker (or this one's
                # next start); if Redis is away, deregistering requeues it.
                await self._eval_patiently("hand back", task_id, tasks.GIVE_BACK, [self._processing, queue],
                                           [task_id])
                return
            if self._free <= 0:
                # No slot after all: first on its queue again, for this worker or another.
                await self._eval_patiently("hand back", task_id, tasks.GIVE_BACK, [self._processing, queue],
                                           [task_id])
                continue
            self._free -= 1
            self._backlog.add(circle)  # more may wait behind it
            self._start_task(task_id, circle)

    async def _take_waiting(self, circle: str, queue: str) -> int:
        """Take and start, in one round trip (:data:`~circles.backend.tasks.TAKE`), as many of the
        tasks waiting on ``queue`` as there are free slots; how many were taken (0: none waits, or
        this worker is not live, and the blocking BLMOVE decides)."""
        most = self._free
        self._free -= most  # held for the step, so that no other loop counts on them meanwhile
        taken = 0
        try:
            reply = await self._eval(tasks.TAKE, [self._processing, self._registry, queue],
                                     [tasks.timestamp(self.reactor.seconds()), self.worker_id, self.prefix, most])
            for task_id, values in zip(reply[0::2], reply[1::2]) if reply else ():
                self._start_task(text(task_id), circle, values)
                taken += 1
        finally:
            self._free += most - taken
            if taken < most:
                self._backlog.discard(circle)  # none waits now: the blocking BLMOVE until one comes
                self._release(0)
        return taken

    def _start_task(self, task_id: str, circle: str, taken: list | None = None) -> None:
        """Run a task in a slot already taken; ``taken``: TAKE claimed it, with these values."""
        self._held.add(task_id)
        d = self._run_task(task_id, circle, taken)
        self._running.add(d)
        d.addBoth(self._task_done, d, task_id)

    def _task_done(self, result, d: Deferred, task_id: str) -> None:
        self._running.discard(d)
        self._held.discard(task_id)
        self._release()
        if isinstance(result, Failure):
            log.failure("running a task", result)

    async def _adopt(self) -> None:
        """Run what this worker's processing list holds that nothing here runs: the tasks of a
        BLMOVE or TAKE whose reply was lost with the connection (CLAIM claims one still pending,
        and answers again for one already claimed by this worker)."""
        ids = [text(i) for i in await self._commands.handler.lrange(self._processing, 0, -1)]
        self._adopt_needed = False
        for task_id in ids:
            if task_id in self._held:
                continue
            circle = text(await self._commands.handler.hget(tasks.task_key(self.prefix, task_id), "circle") or "")
            if circle not in self._blocking:
                continue  # gone, or not a circle served here: CLAIM or the reaper deals with it
            await self._interruptibly(self._when_free())
            if not self.running or task_id in self._held:
                return
            log.info("adopting task {task}: taken before the connection to Redis was lost", task=printable(task_id))
            self._free -= 1
            self._start_task(task_id, circle)

    def _eval(self, script: str, keys: list, args: list) -> Deferred:
        # On the connection itself, not through the factory's handler (two Deferreds more a step).
        connection = live_connection(self._commands) if self._commands is not None else None
        if connection is None:
            raise RedisError("not connected to Redis")
        return connection.eval(script, keys, args)

    def _run_task(self, task_id: str, circle: str, taken: list | None = None) -> Deferred:
        """Claim the task (unless ``taken``: TAKE claimed it, these are the values of its fields
        :data:`~circles.backend.tasks.TAKEN`), run it, record its result.

        Callbacks, not a coroutine, once the task is claimed: per task (the hot path)."""
        if taken is None:
            return ensureDeferred(self._claim_and_run(task_id, circle))
        # (txredisapi gives text; bytes only where a value is not UTF-8.)
        task = {name: value if type(value) is str else text(value)
                for name, value in zip(tasks.TAKEN, taken) if value is not None}
        return self._run(task_id, task, self.reactor.seconds())

    async def _claim_and_run(self, task_id: str, circle: str) -> None:
        now = self.reactor.seconds()
        keys = [tasks.task_key(self.prefix, task_id), self._processing, self._registry,
                tasks.queue_key(self.prefix, circle)]
        claimed, fields = await self._eval_patiently("claim", task_id, tasks.CLAIM, keys,
                                                     [tasks.timestamp(now), self.worker_id, task_id])
        if not claimed:
            return
        if not fields:
            log.info("skipped task {task}: expired, gone, or no longer this worker's", task=printable(task_id))
            return
        await self._run(task_id, {text(k): text(v) for k, v in zip(fields[0::2], fields[1::2])}, now)

    def _run(self, task_id: str, task: dict[str, str], now: float) -> Deferred:
        """Run a claimed task (``task``: its fields) and record its result: a Deferred that fires
        once it is recorded."""
        try:
            deadline: float | None = float(task.get("deadline", ""))
        except ValueError:
            deadline = None
        max_output = self.max_output
        try:
            if int(task.get("max_output", "")) > 0:
                max_output = min(max_output, int(task["max_output"]))
        except ValueError:
            pass  # no cap from the server (an older one): ours alone
        try:
            attempt = max(int(task.get("attempts", "")), 1)
        except ValueError:
            attempt = 1
        context = ScriptContext(task_id=task_id, circle=task.get("circle", ""), caller=task.get("caller", ""),
                                source=task.get("source", ""), deadline=deadline, data=task.get("data"),
                                max_output=max_output, attempt=attempt)
        timeout = self.script_timeout
        if deadline is not None:
            # No use running past the server's deadline; a second of grace for clock skew.
            timeout = min(timeout, max(deadline - now + 1.0, 1.0))
        # A chain, not a coroutine: per task (the hot path).
        recorded: Deferred = Deferred()
        d = self._outcome(task_id, task.get("script", ""), context, timeout, now)
        d.addCallback(self._finished, context, task.get("reply_to", ""), now, recorded)
        d.addErrback(recorded.errback)
        return recorded

    def _finished(self, outcome: tasks.Outcome, context: ScriptContext, reply_to: str, started: float,
                  recorded: Deferred) -> None:
        """Record ``outcome`` (FINISH, with the other results of this turn of the reactor: one
        FINISH_MANY for all of them), then fire ``recorded``.

        ``recorded`` is fired by :meth:`_record_results` itself, not chained to a Deferred of the
        FINISH: per task (the hot path)."""
        task_id = outcome.task_id
        now = self.reactor.seconds()
        keys = [tasks.task_key(self.prefix, task_id), self._processing] + ([reply_to] if reply_to else [])
        # The reply object carries the output and the error; FINISH writes them into the hash
        # only for a bare task id as the reply, which this worker never sends: not sent twice.
        args = [outcome.status, "", "", tasks.timestamp(now), tasks.STATUS_TTL,
                tasks.encode_reply(outcome), outcome.reason, task_id, self.worker_id, self.task_ttl]
        self._results.append(_Finish(task_id, keys, args, recorded, outcome, context, now - started))
        if len(self._results) == 1:
            self._turn_end.callLater(0, lambda: ensureDeferred(self._record_results()))

    def _recorded(self, result: tuple[bool, Any], outcome: tasks.Outcome, context: ScriptContext,
                  duration: float) -> None:
        recorded, written = result
        if not recorded:
            return
        if not int(written):
            log.info("task {task} expired, or was given to another worker, while it ran; result dropped",
                     task=printable(outcome.task_id))
        if log_enabled(LogLevel.debug):
            log.debug("task {task} for circle {circle} ({source}): {outcome} in {duration:.3f}s",
                      task=outcome.task_id, circle=context.circle, source=context.source or "-", duration=duration,
                      outcome=(outcome.status if int(written) else "expired")
                      + (f" ({outcome.reason})" if outcome.reason else ""))

    async def _record_results(self) -> None:
        """The FINISHes of a turn (:meth:`_finished`), in one round trip; each task's ``recorded``
        fired after :meth:`_recorded`."""
        batch, self._results = self._results, []
        try:
            if len(batch) == 1:
                one = batch[0]
                results = [await self._eval_patiently("record the result of", one.task_id, tasks.FINISH, one.keys,
                                                      one.args)]
            else:
                all_keys = [key for entry in batch for key in (entry.keys + [""])[:3]]
                all_args = [arg for entry in batch for arg in entry.args]
                what = f"{batch[0].task_id} and {len(batch) - 1} more"
                recorded, written = await self._eval_patiently("record the results of", what, tasks.FINISH_MANY,
                                                               all_keys, all_args)
                results = [(recorded, written[i] if recorded else None) for i in range(len(batch))]
        except Exception:
            failure = Failure()
            for entry in batch:
                entry.recorded.errback(failure)
            return
        for entry, result in zip(batch, results):
            try:
                self._recorded(result, entry.outcome, entry.context, entry.duration)
            except Exception:
                entry.recorded.errback()
            else:
                entry.recorded.callback(None)

    def _outcome(self, task_id: str, script: str, context: ScriptContext, timeout: float,
                 started: float) -> Deferred:
        """Run ``script`` with the engine, bounded by ``timeout`` seconds and the context's
        ``max_output``: a Deferred of its :class:`~circles.backend.tasks.Outcome` (``completed``,
        or ``error`` with its reason), a failure logged within the worker's budget. While it runs,
        :meth:`_stop_here` stops it (``context.task_id`` is ``task_id``)."""
        d = self._execute(script, context, timeout, stoppable=True)
        return d.addBoth(self._judged, task_id, context, started)

    def _judged(self, result: str | Failure, task_id: str, context: ScriptContext,
                started: float) -> tasks.Outcome | Failure:
        max_output = context.max_output or self.max_output
        if not isinstance(result, Failure):
            size = output_size(result)
            if size <= max_output:
                return tasks.Outcome(task_id, tasks.COMPLETED, result, "", "")
            result = Failure(OutputTooLarge(max_output, size))  # an engine that did not stop at the cap itself
        e = result.value
        output, reason = "", ""
        if isinstance(e, EngineError):
            error, reason = _capped(str(e), max_output), e.reason
            # What it printed before the error goes with it (docs/worker-protocol.md, "output").
            output = output_before_error(e.output, error, max_output)
        elif isinstance(e, Exception):  # a bug in an --engine callable: its traceback is for debugging it
            log.debug("the engine raised on task {task}", task=task_id, log_failure=result)
            error = _capped(f"{type(e).__name__}: {e}", max_output)
        else:
            return result
        # A client can fail scripts as fast as it sends them: logged within a budget, and
        # what comes from the script escaped (no control character reaches the log).
        self.failures.note(printable(context.caller or context.source), reason or "error",
                           "task {task} for circle {circle} failed after {duration:.3f}s: {why}",
                           task=printable(task_id), circle=printable(context.circle),
                           source=printable(context.source), duration=self.reactor.seconds() - started,
                           reason=reason or "error", why=printable(_summary(error, reason)))
        return tasks.Outcome(task_id, tasks.ERROR, output, error, reason)

    async def _eval_patiently(self, what: str, task_id: str, script: str, keys: list,
                              args: list) -> tuple[bool, Any]:
        """``(True, result)`` of a Lua step on the task; if Redis is away (a failover, a
        restart), the step is tried again every half second for up to :data:`RECORD_PATIENCE`
        seconds while the worker runs: a task taken from its queue is claimed and run, and the
        result of a script that ran (a webhook event's, which nobody else waits for) is not
        dropped. CLAIM writes only over ``pending`` and FINISH only over ``processing``, so
        trying again never does a step twice. ``(False, None)``: given up, and logged."""
        give_up = self.reactor.seconds() + RECORD_PATIENCE
        while True:
            try:
                return True, await self._eval(script, keys, args)
            except RedisError as e:
                if not self.running or self.reactor.seconds() >= give_up:
                    log.warn("could not {what} task {task}: {error}", what=what, task=task_id, error=str(e))
                    return False, None
            await deferLater(self.reactor, 0.5, lambda: None)

    # -- stopping what nobody waits for -----------------------------------------------------------

    #: The Lua step reading the statuses of the tasks running here (KEYS: their keys), the key of
    #: a task, and its status while it runs here: a task in any other status is stopped.
    _statuses_step = tasks.STATUSES
    _running_status = tasks.PROCESSING

    def _status_key(self, task_id: str) -> str:
        return tasks.task_key(self.prefix, task_id)

    def _stop_here(self, task_id: str) -> bool:
        """Kill the task's script if it runs here (as its timeout would); whether it did."""
        execution = self._executions.get(task_id)
        if execution is None or task_id in self._stopping:
            return False
        self._stopping.add(task_id)
        self.stopped_tasks += 1
        execution.cancel()
        return True

    def _check(self) -> None:
        if self._checking or not self._executions or self._commands is None:
            return
        self._checking = True
        ensureDeferred(self._check_once())

    async def _check_once(self) -> None:
        """Kill the scripts running here whose task is no longer running here: expired by the
        server (its client left, its deadline passed, a job stopped), reaped, or stopped elsewhere."""
        try:
            running = list(self._executions)
            statuses = await self._eval(self._statuses_step, [self._status_key(t) for t in running], [])
            for task_id, status in zip(running, statuses):
                if text(status) != self._running_status and self._stop_here(task_id):
                    log.info("task {task} is {status} now: its script was stopped", task=printable(task_id),
                             status=text(status) or "gone from Redis")
        except RedisError:
            pass  # the next check tries again
        except Exception:
            log.failure("checking the scripts running")
        finally:
            self._checking = False

    def _execute(self, script: str, context: ScriptContext, timeout: float, stoppable: bool = False) -> Deferred:
        """A Deferred of the engine's output as text; the engine's Deferred is cancelled once
        ``timeout`` seconds passed (:class:`ScriptTimedOut`), or (``stoppable``: a task's script,
        known as the one running here for ``context.task_id`` meanwhile) once its task is no
        longer this worker's to run (:meth:`_stop_here`, :class:`TaskStopped`)."""
        d = maybeDeferred(self.engine, script, context)
        timer, task_id = None, None
        if not d.called:  # (one answered at once, by an engine in this process: nothing to time or stop)
            timer = self.reactor.callLater(timeout, d.cancel)
            if stoppable:
                task_id = context.task_id
                self._executions[task_id] = d
        return d.addBoth(self._executed, timer, task_id, timeout)

    def _executed(self, output: Any, timer: Any, task_id: str | None, timeout: float) -> str | Failure:
        if timer is not None and timer.active():
            timer.cancel()
        stopped = False
        if task_id is not None:
            self._executions.pop(task_id, None)
            stopped = task_id in self._stopping
            self._stopping.discard(task_id)
        if isinstance(output, Failure):
            if output.check(CancelledError):
                if stopped:
                    raise TaskStopped("stopped: its task was no longer this worker's to run")
                raise ScriptTimedOut(f"script timed out after {timeout:g}s")
            return output
        if output is None:
            return ""
        if isinstance(output, bytes):
            return output.decode("utf-8", "replace")
        if not isinstance(output, str):
            raise EngineError(f"the engine returned {type(output).__name__}, not a string")
        return output.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'


_ESCAPED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: str) -> str:
    """``value`` for a log line: control and format characters (C0, DEL, C1, bidi overrides,
    line and paragraph separators) escaped as ``\\xNN``/``\\uNNNN`` (and ``\\n``, ``\\t``,
    ``\\r``, ``\\\\``), as Python's ``repr`` writes them: what a script wrote can neither add a
    line to the log nor send a terminal escape sequence."""
    if value.isprintable() and "\\" not in value:
        return value
    out = []
    for ch in value:
        if ch in _ESCAPED:
            out.append(_ESCAPED[ch])
        elif ch.isprintable() or (ch == " "):
            out.append(ch)
        elif unicodedata.category(ch) == "Zs":
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


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
