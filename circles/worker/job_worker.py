"""``JobWorker``: the reference worker serving an ecosystem dispatcher's protocol
(``circles-worker --worker-protocol hero``), so that a fleet of its Rust workers and ours serve
the same dispatcher during a migration.

Per job (the steps are :class:`~circles.backend.job_schema.JobSteps`): take a job id from the
circle's work queue (``BRPOP``: the oldest first, the dispatcher pushing with ``LPUSH``), start
it (*queued* -> *running*, atomically: a job stopped meanwhile, taken by another worker or gone
is skipped), run its script with the engine exactly as :class:`~circles.worker.service.Worker`
runs a task (the same isolation, limits, output cap and environment allow-list:
:meth:`Worker._outcome <circles.worker.service.Worker._outcome>`), then finish it: ``output``
or ``error``, status *finished* or *failed*, ``updated_at``, and the job id pushed on the job's
reply list, written only if the job is still running (a stopped job keeps its stop).

Stop requests: one connection waits (``BLPOP``) on the stop queues of the worker's circles. A
job id read there is failed in its hash (reason ``stopped``) unless it ended, and killed at once
if it runs here, as a timeout kills it. A circle's workers share its stop queue, so the request
may reach another worker than the one running the job: every second each worker reads the
status of the jobs it runs (one step for all) and kills those that are no longer running.

No heartbeat, no registration, no reaping: the dispatcher's protocol has none. A job taken as
the worker stops goes back first on its queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import deferLater
from txredisapi import RedisError

from circles.backend import tasks
from circles.backend.job_schema import JobSchema, iso_time
from circles.backend.reachability import Reachability
from circles.backend.redis import connect, reached
from circles.backend.redis_url import RedisAddress
from circles.backend.values import text
from circles.common.logs import Logger
from circles.worker.engines import Engine, ScriptContext
from circles.worker.service import POLL, Worker, printable

log = Logger()

#: A job taken when it cannot be run (the worker is stopping, or no slot is free after all):
#: back first on its queue (the end BRPOP takes from).
PUSH_BACK = "return redis.call('RPUSH', KEYS[1], ARGV[1])"


class JobWorker(Worker):
    """Serves the work queues of ``circles`` in the dispatcher protocol ``schema``, at most
    ``concurrency`` scripts at a time (the engine, limits and options of :class:`Worker`; its
    heartbeat options are unused: the protocol has no heartbeat)."""

    def __init__(self, address: RedisAddress, circles: Sequence[str], engine: Engine, *, schema: JobSchema,
                 reactor, **options: Any) -> None:
        super().__init__(address, circles, engine, reactor=reactor, **options)
        self.schema = schema
        self.registered = True  # nothing to register: jobs are taken from the start
        self._stops: Any = None  # txredisapi factory: the one connection waiting on the stop queues

    @property
    def running_jobs(self) -> int:
        """jobs whose script runs here now."""
        return len(self._executions)

    # What Worker's status check reads: the jobs' hashes; a job not ``started`` any more is stopped.
    @property
    def _statuses_step(self) -> str:  # type: ignore[override]
        return self.schema.steps.statuses

    @property
    def _running_status(self) -> str:  # type: ignore[override]
        return self.schema.running

    def _status_key(self, task_id: str) -> str:
        return self.schema.job_key(task_id)

    def startService(self) -> None:
        Service.startService(self)
        log.info("worker {worker} serving {n} circle(s) in the {protocol} dispatcher protocol through Redis at "
                 "{redis}", worker=self.worker_id, n=len(self.circles), protocol=self.schema.name,
                 redis=self.address.where())
        watch = Reachability(self.address, self.reactor, private=self.private_redis)
        self._commands = connect(self.address, self.reactor, reply_timeout=10.0, watch=watch)
        self._blocking = {circle: connect(self.address, self.reactor, watch=watch) for circle in self.circles}
        self._loops = [ensureDeferred(self._take_tasks(circle)) for circle in self.circles]
        if self._unclaimed:  # init scripts: claimed as soon as Redis is reached (no heartbeat to ride on)
            self._loops.append(ensureDeferred(self._claim_when_connected()))
        if self.schema.has_stop_queue:
            self._stops = connect(self.address, self.reactor, watch=watch)
            self._loops.append(ensureDeferred(self._take_stops()))
        self._start_checks()

    async def _stop(self) -> None:
        await super()._stop()  # takes no more jobs, lets the running ones finish, closes its connections
        stops, self._stops = self._stops, None
        if stops is not None:
            await stops.disconnect()

    async def _deregister(self) -> None:
        """Nothing is registered in this protocol."""

    async def _claim_when_connected(self) -> None:
        """Claim the init scripts (``-k PK:FILE``) once the command connection is up; each
        circle's jobs wait for its script to end, as in :class:`Worker`."""
        try:
            connection = await self._interruptibly(self._commands.getConnection(peek=True))
        except CancelledError:
            return
        if self.running:
            self._claim_init_scripts(connection)

    # -- taking jobs ------------------------------------------------------------------------------

    async def _take_tasks(self, circle: str) -> None:
        queue = self.schema.queue_key(circle)
        factory = self._blocking[circle]
        if circle in self._inits_ended:  # the circle's init script first
            await self._interruptibly(self._inits_ended[circle].when())
        while self.running:
            await self._interruptibly(self._when_free())
            if not self.running:
                return
            try:
                # Both connections up before taking a job: one taken must be started.
                await self._interruptibly(self._commands.getConnection(peek=True))
                connection = await self._interruptibly(factory.getConnection(peek=True))
                if not self._connected:
                    self._connected = True
                    log.info("connected to Redis at {redis}, waiting for jobs on {queue}",
                             redis=reached(self.address, factory), queue=queue)
                if self._free <= 0:
                    continue  # another circle's loop took the last slot meanwhile
                reply = await connection.execute_command("BRPOP", queue, POLL, apply_timeout=False)
            except RedisError as e:
                if self._connected:
                    self._connected = False
                    log.warn("lost the connection to Redis at {redis} ({error}); reconnecting quietly",
                             redis=reached(self.address, factory), error=str(e))
                continue
            if not reply:
                continue
            job_id = text(reply[1])
            if not self.running or self._free <= 0:
                # Taken as the worker began to stop, or with no slot free after all: first on its
                # queue again, for another worker or this one.
                await self._eval_patiently("hand back", job_id, PUSH_BACK, [queue], [job_id])
                if not self.running:
                    return
                continue
            self._free -= 1
            self._start_task(job_id, circle)

    def _run_task(self, task_id: str, circle: str, taken: list | None = None) -> Deferred:
        return ensureDeferred(self._run_job(task_id, circle))

    async def _run_job(self, task_id: str, circle: str) -> None:
        schema, steps = self.schema, self.schema.steps
        key = schema.job_key(task_id)
        now = self.reactor.seconds()
        started, fields = await self._eval_patiently("start", task_id, steps.start, [key], [iso_time(now)])
        if not started:
            return
        if not fields:
            log.info("skipped job {job}: not {queued} any more (stopped, taken by another worker, or gone)",
                     job=printable(task_id), queued=schema.queued)
            return
        job = schema.read_job(task_id, {text(k): text(v) for k, v in zip(fields[0::2], fields[1::2])})
        context = ScriptContext(task_id=task_id, circle=job.circle or circle, caller=job.caller, source=job.source,
                                data=job.data, max_output=self.max_output)
        timeout = min(self.script_timeout, job.timeout) if job.timeout else self.script_timeout
        outcome = await self._outcome(task_id, job.script, context, timeout, now)
        status = schema.finished if outcome.status == tasks.COMPLETED else schema.failed
        recorded, written = await self._eval_patiently(
            "record the result of", task_id, steps.finish, [key, schema.reply_key(task_id)],
            [status, outcome.output, outcome.error, outcome.reason, iso_time(self.reactor.seconds()), task_id,
             self.task_ttl])
        if recorded and not int(written):
            log.info("job {job} was stopped while it ran; result dropped", job=printable(task_id))
        log.debug("job {job} for circle {circle} ({source}): {outcome} in {duration:.3f}s", job=task_id,
                  circle=context.circle, source=context.source, duration=self.reactor.seconds() - now,
                  outcome=(status if recorded and int(written) else "stopped")
                  + (f" ({outcome.reason})" if outcome.reason else ""))

    # -- stopping jobs ----------------------------------------------------------------------------

    async def _take_stops(self) -> None:
        keys = [self.schema.stop_key(circle) for circle in self.circles]
        while self.running and self._stops is not None:
            try:
                await self._interruptibly(self._commands.getConnection(peek=True))
                connection = await self._interruptibly(self._stops.getConnection(peek=True))
                reply = await connection.execute_command("BLPOP", *keys, POLL, apply_timeout=False)
            except RedisError:
                await self._interruptibly(deferLater(self.reactor, 0.5, lambda: None))
                continue
            if reply:
                await self._stop_requested(text(reply[1]))

    async def _stop_requested(self, job_id: str) -> None:
        """A stop request: the job fails in its hash (so whichever worker runs it sees it), and is
        killed at once if it runs here."""
        try:
            stopped = int(await self._eval(self.schema.steps.stop_request,
                                           [self.schema.job_key(job_id), self.schema.reply_key(job_id)],
                                           [iso_time(self.reactor.seconds()), "stopped by a stop request", job_id,
                                            self.task_ttl]))
        except RedisError as e:
            log.warn("could not record the stop of job {job}: {error}", job=printable(job_id), error=str(e))
            stopped = 0
        here = self._stop_here(job_id)
        log.info("stop request for job {job}: {what}", job=printable(job_id),
                 what="stopped here" if here else "stopped (not running here)" if stopped else "it had ended")

