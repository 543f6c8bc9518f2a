"""``JobScriptRunner``: plays and webhook events handed to the workers of an ecosystem dispatcher's
protocol (``--worker-protocol hero``), where a job is a hash, the worker's queue a list of job
ids, and the result is read from the hash (:mod:`circles.backend.job_schema`).

The server's side, per play: write the job hash (status *queued*, e.g. hero's ``dispatched``)
and push its id on the circle's work queue, in one step; wait until the hash says the job
ended (*finished*: the output; *failed*: the error), then take the result and drop what is
large from the hash. At the play's deadline, or when its caller leaves, stop the job: it fails
(reason ``stopped``), its id is taken off the queue if no worker took it, else pushed on the
circle's stop queue. A webhook event is written and pushed the same way, once (its seen key, as
in our protocol), and nobody waits for it.

How the server learns that a job ended, without asking Redis about each job at each tick: it
subscribes to Redis's keyspace notifications for the job hashes and the reply lists
(``PSUBSCRIBE __keyspace@{db}__:hero:job:*`` and ``...:hero:reply:*``), which it turns on
(``notify-keyspace-events``, letters ``K``, ``h`` and ``l`` added to what is set) when it
connects. A notification for a job a play waits for makes it read that job once (:attr:`JobSteps.take`):
about three reads per play (its own write, the worker's start, its end) whatever the number
waiting. What a notification could miss (the subscription was down, Redis refused the
setting) is found by a sweep, one step for up to :data:`SWEEP_BATCH` jobs, every
:data:`SWEEP_INTERVAL` seconds, or every :data:`SWEEP_FALLBACK` seconds when notifications
cannot be turned on (the operator is told once). ``docs/worker-protocol.md`` has the
measurements behind the choice.

No live-worker check: the dispatcher's workers do not register, so a play to a circle no worker
serves waits until its timeout (-32003) rather than being refused at once (-32008), and
``circles_workers{circle}`` is not reported for it (the queue length is).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from txredisapi import RedisError, ResponseError
from zope.interface import implementer

from circles.backend import tasks
from circles.backend.job_schema import Job, JobSchema, iso_time
from circles.backend.redis_url import RedisAddress
from circles.backend.replies import Replies, Waiting
from circles.backend.runner import RedisRunner
from circles.backend.scripts import IScriptRunner, Queued, ScriptRequest
from circles.backend.values import text
from circles.common.ids import random_uuid
from circles.common.logs import Logger

log = Logger()

#: Seconds between sweeps of the plays waiting, with notifications on (what they missed), and
#: without (the only way to learn a result then).
SWEEP_INTERVAL = 5.0
SWEEP_FALLBACK = 0.5
#: Jobs looked at by one sweep step (one EVAL): bounds how long one step holds Redis.
SWEEP_BATCH = 500
#: Seconds between PINGs on the subscribed connection (a silently dead one is found so), and how
#: long one may go unanswered.
SUBSCRIBER_PING = 1.0
SUBSCRIBER_PING_TIMEOUT = 5.0
#: The keyspace notification classes the runner needs: keyspace events (K) of hashes (h) and lists (l).
NOTIFICATIONS = "Khl"
#: The letters Redis writes for "every class" (A stands for all of these).
_ALL_CLASSES = set("g$lshzxetd")


def with_notifications(current: str) -> str | None:
    """The ``notify-keyspace-events`` value that adds :data:`NOTIFICATIONS` to ``current``; None
    when ``current`` has them already. Nothing set is ever taken away (another application may
    rely on it)."""
    have = set(current)
    if "A" in have:
        have |= _ALL_CLASSES
    missing = [letter for letter in NOTIFICATIONS if letter not in have]
    return current + "".join(missing) if missing else None


class JobWaits(Replies):
    """The plays waiting for their jobs: :class:`~circles.backend.replies.Replies`, whose
    deadlines and cancellations stop the job (:meth:`expire`), and whose results are read from
    the job hash when told to look (:meth:`wake`), not routed from a reply list."""

    def __init__(self, clock: IReactorTime, schema: JobSchema, command, connected) -> None:
        super().__init__(clock, "", "", command, connected)
        self.schema = schema
        self._circle_of: dict[str, str] = {}  # job id -> its circle, until it is settled or stopped

    def wait(self, task_id: str, request: ScriptRequest) -> Deferred:
        self._circle_of[task_id] = request.circle
        return super().wait(task_id, request)

    def not_queued(self, task_id, failure) -> None:
        self._circle_of.pop(task_id, None)
        super().not_queued(task_id, failure)

    def settle(self, task_id: str, outcome: tasks.Outcome) -> None:
        self._circle_of.pop(task_id, None)
        super().settle(task_id, outcome)

    def outcome(self, task_id: str, reply: list) -> tasks.Outcome:
        """A :class:`tasks.Outcome` from a take or stop step's ``{status, output, error, reason}``."""
        status, output, error, reason = (None if v is None else text(v) for v in reply)
        schema = self.schema
        mapped = {schema.finished: tasks.COMPLETED, schema.failed: tasks.ERROR, "stopped": tasks.EXPIRED}.get(
            status or "", status or "missing")
        return tasks.Outcome(task_id, mapped, output or "", error or "", reason or "")

    def expire(self, task_id: str, why: str = "") -> Deferred:
        """Stop the job (see :attr:`~circles.backend.job_schema.JobSteps.stop`); fire with its
        outcome: ``expired`` if stopped now, the result if it ended just before."""
        circle = self._circle_of.pop(task_id, "")
        schema = self.schema
        keys = [schema.job_key(task_id), schema.queue_key(circle) if circle else "",
                schema.stop_key(circle) if circle and schema.has_stop_queue else "", schema.reply_key(task_id)]
        d = self._command("eval", schema.steps.stop, keys, [iso_time(self.clock.seconds()), task_id,
                                                            tasks.STATUS_TTL, tasks.TASK_TTL,
                                                            f"stopped by the dispatcher: {why or 'nobody waits'}"])
        d.addCallback(lambda reply: self.outcome(task_id, reply))
        return d

    def _finished_at_deadline(self, task_id: str, entry: Waiting, outcome: tasks.Outcome) -> None:
        self.settle(task_id, outcome)  # the stop step read its result: there is no reply to wait for

    def wake(self, job_id: str) -> None:
        """Something changed in the job's hash, or its reply came: take its result if it ended."""
        if not self.waits_for(job_id):
            return
        d = self._command("eval", self.schema.steps.take, [self.schema.job_key(job_id),
                                                           self.schema.reply_key(job_id)], [tasks.STATUS_TTL])
        # Callbacks, not a coroutine: per notification (the hot path). A failure: the next sweep looks again.
        d.addCallbacks(self._taken, lambda _: None, callbackArgs=(job_id,))

    def _taken(self, reply: list, job_id: str) -> None:
        outcome = self.outcome(job_id, reply)
        if outcome.status in (tasks.COMPLETED, tasks.ERROR):
            self.settle(job_id, outcome)
        elif outcome.status == "missing":
            self.settle(job_id, tasks.Outcome(job_id, tasks.ERROR, error="the job is gone from Redis before it "
                                              "ended (deleted, or Redis lost its data)"))


class QueueLengths:
    """The served circles' work queue lengths, read every
    :data:`~circles.backend.tasks.HEARTBEAT_INTERVAL` seconds for ``/metrics``: as
    :class:`~circles.backend.housekeeping.Housekeeping` reports them, but with no live-worker
    count (None: the dispatcher's workers do not register) and no dead-letter list."""

    LENGTHS = "local n = {} for i, k in ipairs(KEYS) do n[i] = redis.call('LLEN', k) end return n"

    def __init__(self, clock: IReactorTime, schema: JobSchema, command, connected, circles=frozenset()) -> None:
        self.clock = clock
        self.schema = schema
        self._command = command
        self._connected = connected
        self.circles = sorted(circles)
        self.circle_stats: dict[str, tuple[int | None, int]] = {}
        self.dead_letters: int | None = None
        #: Called with :attr:`circle_stats` after each round that read them (as Housekeeping's are):
        #: their worker counts are None, unknown.
        self.watchers: list[Callable[[dict[str, tuple[int | None, int]]], None]] = []
        self._looping: LoopingCall | None = None

    def start(self) -> None:
        if self.circles:
            self._looping = LoopingCall(self._round)
            self._looping.clock = self.clock
            self._looping.start(tasks.HEARTBEAT_INTERVAL, now=False)

    def stop(self) -> None:
        if self._looping is not None and self._looping.running:
            self._looping.stop()

    def _round(self) -> Deferred | None:
        if not self._connected():
            return None
        return ensureDeferred(self._read())

    async def _read(self) -> None:
        try:
            lengths = await self._command("eval", self.LENGTHS, [self.schema.queue_key(c) for c in self.circles], [])
        except Exception:
            return  # Redis trouble: the next round tries again
        self.circle_stats = {circle: (None, int(n)) for circle, n in zip(self.circles, lengths)}
        for watcher in self.watchers:
            watcher(self.circle_stats)


@implementer(IScriptRunner)
class JobScriptRunner(RedisRunner):
    """An :class:`~circles.backend.scripts.IScriptRunner` speaking a dispatcher's job schema
    (``schema``, e.g. :data:`circles.backend.hero.HERO`); its connections, health and replica
    acknowledgements are :class:`~circles.backend.runner.RedisRunner`'s.

    :param prefix: our keys' prefix: webhook events' seen keys and the runner's probe key (the
        schema's keys are its own).
    :param circles: the circles served, whose work queue lengths are read for ``/metrics``.
    :param task_ttl: seconds a job's hash lives past its timeout.
    """

    subscriber = True

    def __init__(self, address: RedisAddress, *, schema: JobSchema, reactor, prefix: str = tasks.DEFAULT_PREFIX,
                 server_id: str | None = None, task_ttl: int = tasks.TASK_TTL, private_redis: bool = False,
                 ack_replicas: int = 0, ack_timeout: float = 1.0, circles=frozenset()) -> None:
        super().__init__(address, reactor=reactor, prefix=prefix, server_id=server_id, private_redis=private_redis,
                         ack_replicas=ack_replicas, ack_timeout=ack_timeout)
        self.schema = schema
        self.task_ttl = task_ttl
        self.replies: JobWaits = JobWaits(reactor, schema, self._command, self.is_connected)
        self.housekeeping = QueueLengths(reactor, schema, self._command, self.is_connected, circles)
        self.notifications = False  # keyspace notifications are on (else sweeps are all there is)
        self._refusals_told = False  # the operator was told notifications could not be turned on
        self._last_sweep = 0.0
        # The channels of the job hashes' and the reply lists' notifications, less the job id.
        self._channels = [f"__keyspace@{address.db or 0}__:{key}" for key in (schema.job_key(""), schema.reply_key(""))]
        self.notified = 0  # notifications about jobs that plays wait for
        self.sweeps = 0  # sweep steps sent

    def _describe(self) -> str:
        return f"the {self.schema.name} dispatcher protocol ({self.schema.queue_key('{circle}')})"

    # -- API ------------------------------------------------------------------------------------

    def _job(self, job_id: str, request: ScriptRequest, data: str | None) -> tuple[list, int]:
        """The job hash as a flat ``[field, value, ...]`` list, and the hash's TTL."""
        job = Job(id=job_id, circle=request.circle, caller=request.caller, script=request.script,
                  timeout=request.timeout, source=request.source, created_at=self.clock.seconds(), data=data)
        fields = self.schema.job_fields(job)
        return [item for pair in fields.items() for item in pair], math.ceil(request.timeout) + self.task_ttl

    def run(self, request: ScriptRequest) -> Deferred:
        """Write the job, push its id; fire with the output, or fail with a ScriptError."""
        if not self.is_connected():
            return fail(self._refusal())
        job_id = random_uuid()
        result = self.replies.wait(job_id, request)
        fields, ttl = self._job(job_id, request, None)
        d = self._command("eval", self.schema.steps.dispatch,
                          [self.schema.job_key(job_id), self.schema.queue_key(request.circle)], [ttl, job_id] + fields)
        d.addErrback(lambda failure: self.replies.not_queued(job_id, failure))
        return result

    def enqueue_once(self, request: ScriptRequest, data_json: str, key: str, ttl: int) -> Deferred:
        """A webhook event's job, written and pushed unless the event ``key`` was in the last
        ``ttl`` seconds; nobody waits for its result. Fire with a :class:`Queued`."""
        if not self.is_connected():
            return fail(self._refusal())
        job_id = random_uuid()
        fields, job_ttl = self._job(job_id, request, data_json)
        keys = [tasks.seen_key(self.prefix, key), self.schema.job_key(job_id), self.schema.queue_key(request.circle)]
        args = [ttl, job_ttl, job_id] + fields
        if self.acks.replicas:
            d = ensureDeferred(self.acks.enqueue_once(keys, args, self.schema.steps.dispatch_once))
        else:
            d = self._command("eval", self.schema.steps.dispatch_once, keys, args)
        return d.addCallback(lambda result: Queued(text(result[1]), duplicate=not int(result[0])))

    # -- learning that jobs ended ---------------------------------------------------------------

    def _message(self, pattern: str | None, channel: str, message: str) -> None:
        """A keyspace notification: a job hash or a reply list changed."""
        for prefix in self._channels:
            if channel.startswith(prefix):
                job_id = channel[len(prefix):]
                if self.replies.waits_for(job_id):
                    self.notified += 1
                    self.replies.wake(job_id)
                return

    async def _connecting(self, connection: Any) -> None:
        await self._turn_notifications_on()
        await connection.psubscribe([f"{channel}*" for channel in self._channels])

    async def _turn_notifications_on(self) -> None:
        commands = self._commands
        if commands is None:
            return
        try:
            reply = await commands.handler.execute_command("CONFIG", "GET", "notify-keyspace-events")
            current = text(reply[1]) if isinstance(reply, list) and len(reply) > 1 else ""
            wanted = with_notifications(current)
            if wanted is not None:
                await commands.handler.execute_command("CONFIG", "SET", "notify-keyspace-events", wanted)
                log.info("Redis keyspace notifications turned on (notify-keyspace-events {value}): "
                         "plays learn their jobs' results from them", value=wanted)
            self.notifications = True
        except ResponseError as e:
            self.notifications = False
            if not self._refusals_told:
                self._refusals_told = True
                log.warn("Redis refused to turn on keyspace notifications ({error}): plays look for their jobs' "
                         "results every {every}s instead; set notify-keyspace-events to include {letters} on that "
                         "Redis", error=str(e), every=SWEEP_FALLBACK, letters=NOTIFICATIONS)

    def _connected_again(self) -> None:
        super()._connected_again()
        self._last_sweep = -math.inf  # look at once: a notification may have been missed meanwhile

    async def _read(self, connection: Any) -> None:
        """Every second: a PING on the subscribed connection (a dead one is found within
        seconds), and a sweep when one is due."""
        now = self.clock.seconds()
        if now - self._last_sweep >= (SWEEP_INTERVAL if self.notifications else SWEEP_FALLBACK):
            self._last_sweep = now
            await self.sweep()
        await deferLater(self.clock, SUBSCRIBER_PING if self.notifications else SWEEP_FALLBACK, lambda: None)
        pong = connection.ping()
        pong.addTimeout(SUBSCRIBER_PING_TIMEOUT, self.clock)
        try:
            await pong
        except TimeoutError:
            connection.transport.loseConnection()
            raise RedisError(f"no answer to a PING within {SUBSCRIBER_PING_TIMEOUT:g}s") from None

    async def sweep(self) -> None:
        """Look at every job a play waits for, :data:`SWEEP_BATCH` at a time, and take the
        results of those that ended (or are gone)."""
        waiting = self.replies.waiting_for()
        for start in range(0, len(waiting), SWEEP_BATCH):
            batch = waiting[start:start + SWEEP_BATCH]
            self.sweeps += 1
            try:
                ended = await self._command("eval", self.schema.steps.sweep,
                                            [self.schema.job_key(job_id) for job_id in batch], [])
            except Exception:
                return  # Redis trouble: the next sweep looks again
            for index in ended:
                self.replies.wake(batch[int(index) - 1])
