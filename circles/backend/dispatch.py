"""``RedisScriptRunner``: hands scripts to circle workers through Redis and relays the result.

One runner per server process. It holds two Redis connections whatever the load: one for
commands (pipelined by txredisapi) and one that blocks in ``BRPOP`` on this server's reply list
and routes each reply to the request waiting for it, by task id. ``docs/worker-protocol.md``
describes what a worker sees.

Failure policy: while either connection is down, :meth:`run` and :meth:`enqueue_once` fail at
once with :class:`BackendUnavailable` (nothing is queued); requests waiting for a reply when the
reply connection drops fail the same way, and their tasks are marked ``expired`` once Redis is
back so they do not run for nobody. Reconnection is automatic. A :meth:`run` whose Deferred is
cancelled (its client disconnected) is forgotten and its task expired the same way.

A Redis that is connected but does not answer (stopped, swapping, wedged) is not up either: a
PING goes out every :data:`PING_INTERVAL` seconds on the command connection, one at a time
(never a second while the first waits), and once one has waited :data:`PING_TIMEOUT` seconds
the backend counts as unavailable (``/ready`` 503, plays -32004 at once) until one is answered.

Replicated Redis (``redis+sentinel://``, or ``ack_replicas``): the health check is ``ROLE``
instead of PING. A node that is no longer the primary has its connections dropped, so they
reconnect to the one the Sentinels name; a failover is thus the same as a lost connection
(plays waiting fail -32004 at once, their tasks are expired on the new primary), and replies
are read from the new primary's reply list. ``ROLE`` also counts the primary's replicas:
:meth:`enqueue_once` answers only once ``ack_replicas`` of them hold the task (``WAIT``), and
fails at once while fewer are connected: an event only the primary holds could vanish with it.
Concurrent events share their waits (group commit, :mod:`circles.backend.group_wait`): their
writes go, pipelined, on one connection of their own (WAIT blocks the connection it is sent on,
so never the command connection), and one WAIT at a time is in flight there, covering every
write sent before it; the events written while it blocks are covered by the next one. A WAIT
that says fewer replicas than asked, or a write connection lost before its WAIT is answered,
fails every event it covers (503: the provider retries, and its retry is a duplicate if the
first delivery reached the primary).

A Redis at its ``maxmemory`` (``noeviction``) refuses writes with ``OOM command not allowed``:
the runner is then *full* (:class:`BackendFull`: plays -32004 saying so, webhooks 503, ``/ready``
503 with the reason) and queues nothing more, without asking Redis, until the health loop finds
room again: while full it sends a small write (``SET`` of a key of its own, expiring at once)
instead of its PING, and the first one Redis takes ends it.
"""

from __future__ import annotations

import math
import secrets
import uuid
from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from txredisapi import InvalidData, RedisError, ResponseError
from zope.interface import implementer

from circles.backend import tasks
from circles.backend.admin import reap
from circles.backend.embedded import START_TIMEOUT
from circles.backend.group_wait import GroupWait
from circles.backend.reachability import Reachability
from circles.backend.redis import connect, reached
from circles.backend.redis_url import RedisAddress
from circles.backend.values import text
from circles.backend.scripts import (BackendFull, BackendUnavailable, IScriptRunner, NoWorker, Queued,
                                     ScriptFailed, ScriptRequest, ScriptTimeout)
from circles.common.logs import Logger, worth_logging

log = Logger()

#: BRPOP's own timeout on the reply list: bounds how long a silently dead connection goes unnoticed.
REPLY_POLL = 5
#: Seconds a command may wait for Redis before the connection is considered dead and reset.
COMMAND_TIMEOUT = 10.0
#: Seconds between health PINGs, and how long one may go unanswered before Redis counts as down.
PING_INTERVAL = 1.0
PING_TIMEOUT = 2.0
#: Seconds a play whose task a worker finished just as its deadline passed waits for the reply
#: already on its way (the finished task's hash no longer holds the result).
REPLY_GRACE = 5.0
#: Webhook events written and waiting for replicas to acknowledge them (their WAIT), beyond
#: which they are refused at once: what the write connection holds is bounded by this many bodies.
MAX_ACK_WAITING = 64
#: What a play or webhook event refused by a full Redis is told.
FULL = "Redis is full (maxmemory): nothing was queued; retry later"
#: Milliseconds the health loop's write, sent while Redis is full, lives.
PROBE_TTL_MS = 2000


def is_oom(message: str) -> bool:
    """Whether a Redis error reply says it is at its maxmemory (a write refused, noeviction)."""
    return message.startswith("OOM") or "OOM command not allowed" in message


class _Waiting:
    """A :meth:`RedisScriptRunner.run` call waiting for its reply."""

    def __init__(self, request: ScriptRequest, deferred: Deferred, timer) -> None:
        self.request = request
        self.deferred = deferred
        self.timer = timer

    def stop_timer(self) -> None:
        if self.timer.active():
            self.timer.cancel()


@implementer(IScriptRunner)
class RedisScriptRunner(Service):
    """The production :class:`~circles.backend.scripts.IScriptRunner`: a producer of Redis tasks.

    :param address: where Redis is (see :func:`circles.backend.redis_url.parse_redis_url`).
    :param reactor: provides IReactorTime (deadlines, timestamps) and connects.
    :param prefix: prepended to every key, default :data:`~circles.backend.tasks.DEFAULT_PREFIX`.
    :param server_id: names this process's reply list; random by default. Two live servers
        must never share one.
    :param max_output: the largest output (UTF-8 bytes) this server can send back, written into
        every task as ``max_output`` so the worker refuses a larger one before it reaches Redis;
        None: no such field.
    :param private_redis: ``address`` is the server's own private Redis, which it starts (so it
        may take a while to answer, and what to check is its ``--state-dir``), not a URL given.
    :param ack_replicas: replicas that must hold a task of :meth:`enqueue_once` before it
        succeeds (Redis ``WAIT``), within ``ack_timeout`` seconds; 0: the primary is enough.
    :param circles: the circles this server serves, whose live workers and queue lengths it
        reads every :data:`~circles.backend.tasks.HEARTBEAT_INTERVAL` seconds (:attr:`circle_stats`,
        for ``/metrics``); empty: none (a server of any circle has no bounded set to report).
    :param webhook_attempts: the runs a webhook task gets (its ``max_attempts``) when workers
        running it are lost; past them it is dead-lettered.

    Every :data:`~circles.backend.tasks.HEARTBEAT_INTERVAL` seconds the runner also reaps the
    workers whose heartbeat lapsed (as workers do): a server alone still answers the plays of
    a dead worker and re-queues its webhook tasks.
    """

    def __init__(self, address: RedisAddress, *, reactor, prefix: str = tasks.DEFAULT_PREFIX,
                 server_id: Optional[str] = None, task_ttl: int = tasks.TASK_TTL,
                 max_output: Optional[int] = None, private_redis: bool = False,
                 ack_replicas: int = 0, ack_timeout: float = 1.0, circles=frozenset(),
                 webhook_attempts: int = tasks.DEFAULT_ATTEMPTS) -> None:
        self.address = address
        self.private_redis = private_redis
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.prefix = prefix
        self.server_id = server_id or secrets.token_hex(8)
        self.reply_key = tasks.reply_key(prefix, self.server_id)
        self.task_ttl = task_ttl
        self.max_output = max_output
        self._commands = None  # txredisapi factory: pipelined commands
        self._replies = None  # txredisapi factory: the one blocking BRPOP connection
        self._listening = False  # a BRPOP on the reply list is in flight on a live connection
        self._loop: Optional[Deferred] = None
        self._waiting: "dict[str, _Waiting]" = {}
        self.connects = 0  # times both connections came up (for metrics: reconnects)
        self.command_failures = 0  # commands Redis answered with an error (logged: the 1st, 10th, 100th...)
        self._abandoned: "set[str]" = set()  # tasks given up on while Redis was unreachable
        self._pinger: Optional[LoopingCall] = None
        self._ping_sent: Optional[float] = None  # when the outstanding PING went out; None: none is
        self.pings = 0  # PINGs sent
        self.answering = True  # False once a PING has waited PING_TIMEOUT, until one is answered
        self.full = False  # Redis refused a write at its maxmemory; until the health loop's write is taken
        self.probe_key = f"{prefix}probe:{self.server_id}"  # what that write sets
        self.ack_replicas = ack_replicas
        self.ack_timeout = ack_timeout
        self._acks = None  # txredisapi factory: the one connection that writes and WAITs (ack_replicas > 0)
        self._ack_waiting = 0  # enqueue_once calls written there, or being written, not yet acknowledged
        self._group_wait = GroupWait(ack_replicas, ack_timeout)  # one WAIT in flight covers them all
        self.replicated = bool(address.sentinels) or ack_replicas > 0  # health by ROLE, not PING
        self.replicas: Optional[int] = None  # replicas the primary has, as ROLE last said; None: unknown
        self.circles = sorted(circles)
        self.webhook_attempts = webhook_attempts
        self.circle_stats: "dict[str, tuple[int, int]]" = {}  # circle -> (live workers, queue length)
        self.dead_letters: Optional[int] = None  # the dead-letter list's length, as last read
        self.reaped = 0  # dead workers reaped by this server
        self._housekeeper: Optional[LoopingCall] = None
        self._housekeeping = False  # a round is in flight

    # -- service --------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        log.info("script dispatch through Redis at {redis}, reply list {reply}",
                 redis=self.address.where(), reply=self.reply_key)
        watch = Reachability(self.address, self.reactor, private=self.private_redis,
                             starting=START_TIMEOUT if self.private_redis else 0.0)
        self._commands = connect(self.address, self.reactor, reply_timeout=COMMAND_TIMEOUT, watch=watch)
        self._replies = connect(self.address, self.reactor, watch=watch)
        if self.ack_replicas:
            log.info("webhook events are answered once {n} Redis replica(s) hold them (within {timeout}s)",
                     n=self.ack_replicas, timeout=self.ack_timeout)
            # A write sent while a WAIT blocks the connection is answered after it.
            self._acks = connect(self.address, self.reactor, reply_timeout=COMMAND_TIMEOUT + self.ack_timeout,
                                 watch=watch)
        self._loop = ensureDeferred(self._listen())
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.clock
        self._pinger.start(PING_INTERVAL, now=False)
        self._housekeeper = LoopingCall(self._housekeep)
        self._housekeeper.clock = self.clock
        self._housekeeper.start(tasks.HEARTBEAT_INTERVAL, now=False)

    def stopService(self) -> Deferred:
        """Answer the plays still waiting (:class:`BackendUnavailable`), expire their tasks if
        Redis is there to be told, and close both connections."""
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        super().stopService()
        for looping in (self._pinger, self._housekeeper):
            if looping is not None and looping.running:
                looping.stop()
        waiting, self._waiting = self._waiting, {}
        for task_id, entry in waiting.items():
            entry.stop_timer()
            entry.deferred.errback(BackendUnavailable("the server is shutting down"))
        if self.is_connected():
            # Best effort, so no worker runs a script nobody waits for any more.
            await DeferredList([self._expire(task_id) for task_id in waiting], consumeErrors=True)
        factories = [f for f in (self._replies, self._commands, self._acks) if f is not None]
        self._commands = self._replies = self._acks = None
        self._listening = False
        await DeferredList([f.disconnect() for f in factories], consumeErrors=True)
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()  # it may be waiting for a connection that will never come
            await loop.addErrback(lambda f: f.trap(CancelledError))

    @property
    def in_flight(self) -> int:
        """plays waiting for a worker's answer."""
        return len(self._waiting)

    def is_connected(self) -> bool:
        """Whether a task can be queued and its reply received right now."""
        return (self._listening and self.answering and not self.full and self._commands is not None
                and self._commands.size > 0)

    def _refusal(self) -> BackendUnavailable:
        """Why nothing can be queued now (``is_connected()`` is false)."""
        if self.full and self._listening and self.answering:
            return BackendFull(FULL)
        if not self.running:  # stopped: the server is shutting down, whatever Redis does
            return BackendUnavailable("the server is shutting down")
        return BackendUnavailable("Redis is unreachable")

    def _filled(self) -> None:
        """Redis refused a write at its maxmemory: nothing is queued until it has room again."""
        if not self.full:
            self.full = True
            log.warn("Redis is full (at its maxmemory): plays get -32004 and webhook events 503 until it has room")

    # -- health ---------------------------------------------------------------------------------

    def _ping(self) -> None:
        if self._ping_sent is not None:
            waited = self.clock.seconds() - self._ping_sent
            if self.answering and waited >= PING_TIMEOUT:
                self.answering = False
                log.warn("Redis has not answered a PING for {seconds:.0f}s: plays fail until it does",
                         seconds=waited)
            return  # one PING at a time: never pile them up behind a Redis that does not answer
        if self._commands is None or self._commands.size == 0:
            return
        self._ping_sent = self.clock.seconds()
        self.pings += 1
        probe = self.full  # full: only a write tells whether Redis takes writes again
        try:
            if probe:
                d = self._commands.handler.execute_command("SET", self.probe_key, "1", "PX", PROBE_TTL_MS)
            else:
                d = self._commands.handler.role() if self.replicated else self._commands.handler.ping()
        except Exception:
            d = fail()
        d.addBoth(self._pong, probe)

    def _pong(self, result, probe: bool = False) -> None:
        self._ping_sent = None
        if probe:
            self._probed(result)
            return
        if isinstance(result, Failure):
            return  # the connection dropped (or timed out): is_connected() says so meanwhile
        if self.replicated and not self._primary_says(result):
            return
        if not self.answering:
            self.answering = True
            log.info("Redis answers again")

    def _probed(self, result) -> None:
        """The health loop's write, sent while full, was answered (or not)."""
        if isinstance(result, Failure) and not result.check(ResponseError):
            return  # the connection dropped (or timed out): is_connected() says so meanwhile
        if not self.answering:
            self.answering = True
            log.info("Redis answers again")
        if isinstance(result, Failure) and is_oom(result.getErrorMessage()):
            return  # still full
        # Room again (or a write refused for another reason, which the next task's error says).
        self.full = False
        log.info("Redis has room again: plays and webhook events are queued again")
        self._expire_abandoned()

    def _primary_says(self, role: list) -> bool:
        """Whether ``ROLE`` came from a primary; if so, note its replicas. A node that is no
        longer the primary (demoted by a failover) has every connection dropped: they
        reconnect to where the Sentinels say the primary is now."""
        if role and text(role[0]) == "master":
            self.replicas = len(role[2]) if len(role) > 2 and isinstance(role[2], list) else 0
            return True
        self.replicas = None
        log.warn("Redis at {redis} is no longer the primary (its role is {role}): reconnecting",
                 redis=reached(self.address, self._commands), role=text(role[0]) if role else "unknown")
        if not self.address.sentinels:
            self.answering = False  # a redis:// URL cannot name another node: fail until it is primary again
            return False
        for factory in (self._commands, self._replies, self._acks):
            for connection in list(factory.pool) if factory is not None else ():
                connection.transport.loseConnection()
        return False

    # -- workers --------------------------------------------------------------------------------

    def _housekeep(self) -> None:
        """Reap the workers whose heartbeat lapsed, and read the served circles' live workers and
        queue lengths (for ``/metrics``). One round at a time; Redis trouble waits for the next."""
        if self._housekeeping or not self.is_connected():
            return
        self._housekeeping = True
        d = ensureDeferred(self._housekeeping_round())
        d.addErrback(lambda f: f.trap(RedisError, BackendUnavailable, CancelledError))
        d.addErrback(lambda f: log.failure("reaping workers", f))

        def done(_) -> None:
            self._housekeeping = False
        d.addBoth(done)

    async def _housekeeping_round(self) -> None:
        await reap(self._commands.handler, self.prefix, counter=self)
        if self._commands is None:
            return
        counts = await self.stats(self.circles)
        self.dead_letters, self.circle_stats = counts

    async def stats(self, circles) -> "tuple[int, dict[str, tuple[int, int]]]":
        """``(dead letters, {circle: (live workers, queue length)})`` for ``circles``, in one step."""
        keys = [tasks.dead_key(self.prefix)]
        for circle in circles:
            keys += [tasks.circle_workers_key(self.prefix, circle), tasks.queue_key(self.prefix, circle)]
        counts = [int(n) for n in await self._command("eval", tasks.STATS, keys, [])]
        return counts[0], {circle: (counts[1 + 2 * i], counts[2 + 2 * i]) for i, circle in enumerate(circles)}

    # -- API ------------------------------------------------------------------------------------

    def run(self, request: ScriptRequest) -> Deferred:
        """Queue ``request`` for the circle's workers; fire with the output text, or fail with
        :class:`ScriptTimeout`, :class:`ScriptFailed` or :class:`BackendUnavailable`."""
        if not self.is_connected():
            return fail(self._refusal())
        task_id = str(uuid.uuid4())
        result = Deferred(lambda _: self._cancelled(task_id))
        timer = self.clock.callLater(request.timeout, self._timed_out, task_id)
        self._waiting[task_id] = _Waiting(request, result, timer)
        queued = self._write(task_id, request)

        def not_queued(failure: Failure) -> None:
            entry = self._waiting.pop(task_id, None)
            if entry is not None:
                entry.stop_timer()
                entry.deferred.errback(failure)

        queued.addErrback(not_queued)
        return result

    def enqueue_once(self, request: ScriptRequest, data_json: str, key: str, ttl: int) -> Deferred:
        """Queue ``request`` without waiting for its result (webhooks), with ``data_json`` stored
        as given in the task's ``data`` (the provider's body, byte for byte), unless the event
        ``key`` (a name under the ``seen:`` prefix) was queued in the last ``ttl`` seconds. The
        task has no ``reply_to``, and its hash lives ``request.timeout`` + the task TTL seconds.
        Fire with a :class:`~circles.backend.scripts.Queued`; on failure nothing was queued and
        ``key`` is free."""
        if not self.is_connected():
            return fail(self._refusal())
        task_id = str(uuid.uuid4())
        fields, task_ttl = self._fields(request, data_json, "")
        keys = [tasks.seen_key(self.prefix, key), tasks.task_key(self.prefix, task_id),
                tasks.queue_key(self.prefix, request.circle)]
        args = [ttl, task_ttl, task_id] + fields
        if self.ack_replicas:
            d = ensureDeferred(self._enqueue_acknowledged(keys, args))
        else:
            d = self._command("eval", tasks.ENQUEUE_ONCE, keys, args)

        def done(result) -> Queued:
            queued = Queued(text(result[1]), duplicate=not int(result[0]))
            log.debug("{what} task {task} for circle {circle} from {source}",
                      what="already queued:" if queued.duplicate else "queued",
                      task=queued.task_id, circle=request.circle, source=request.source)
            return queued

        return d.addCallback(done)

    @property
    def awaiting_replicas(self) -> int:
        """webhook events written (or being written) and waiting for replicas to acknowledge them."""
        return self._ack_waiting

    async def _enqueue_acknowledged(self, keys: list, args: list) -> list:
        """ENQUEUE_ONCE on the write connection, then wait for the ``WAIT`` that covers it to say
        :attr:`ack_replicas` replicas hold it (:class:`~circles.backend.group_wait.GroupWait`:
        one WAIT covers every event written before it). A duplicate rewrites its seen key as it
        is, so that the WAIT covers the first delivery too: its 503 may have come from a replica
        that had not caught up.

        Every command here is sent at once, as one command (``EVAL``, never txredisapi's
        EVALSHA-then-EVAL, whose second try would go out after a WAIT that the event counts on)."""
        if self.replicas is not None and self.replicas < self.ack_replicas:
            raise BackendUnavailable(f"the Redis primary has {self.replicas} replica(s) connected, "
                                     f"{self.ack_replicas} must hold each webhook event")
        connection = next((c for c in self._acks.pool if c.connected), None) if self._acks is not None else None
        if connection is None:
            raise BackendUnavailable("Redis is unreachable")
        if self._ack_waiting >= MAX_ACK_WAITING:
            raise BackendUnavailable("too many webhook events waiting for Redis replicas")
        self._ack_waiting += 1
        covering: "list[Deferred]" = []  # the WAITs asked for; only the last one's answer counts
        try:
            written = connection.execute_command("EVAL", tasks.ENQUEUE_ONCE, len(keys), *keys, *args)
            covering.append(self._group_wait.after_writes(connection))
            result = await written
            if not int(result[0]):
                rewritten = connection.execute_command("SET", keys[0], text(result[1]), "XX", "KEEPTTL")
                covering.append(self._group_wait.after_writes(connection))
                await rewritten
            acknowledged = int(await covering[-1])
        except InvalidData:
            raise ValueError("a task field is not valid UTF-8 text") from None
        except RedisError as e:
            if is_oom(str(e)):
                self._filled()
                raise BackendFull(FULL) from None
            raise BackendUnavailable(f"Redis error: {e}") from None
        finally:
            self._ack_waiting -= 1
            for wait in covering:
                wait.addErrback(lambda _: None)  # an answer no longer awaited (a failed write's)
        if acknowledged < self.ack_replicas:
            raise BackendUnavailable(f"{acknowledged} of {self.ack_replicas} Redis replica(s) acknowledged the "
                                     f"webhook event within {self.ack_timeout}s")
        return result

    # -- writing tasks --------------------------------------------------------------------------

    def _fields(self, request: ScriptRequest, data_json: Optional[str], reply_to: str) -> "tuple[list, int]":
        """The task hash as a flat ``[field, value, ...]`` list, and the hash's TTL."""
        now = self.clock.seconds()
        fields = {
            "script": request.script,
            "circle": request.circle,
            "caller": request.caller,
            "source": request.source,
            "reply_to": reply_to,
            "status": tasks.PENDING,
            "output": "",
            "error": "",
            "created_at": tasks.timestamp(now),
            "updated_at": tasks.timestamp(now),
            "deadline": tasks.timestamp(now + request.timeout),
        }
        if self.max_output is not None:
            fields["max_output"] = str(self.max_output)
        if data_json is not None:
            fields["data"] = data_json
            fields["max_attempts"] = str(self.webhook_attempts)  # runs allowed when workers are lost
        return [item for pair in fields.items() for item in pair], math.ceil(request.timeout) + self.task_ttl

    def _write(self, task_id: str, request: ScriptRequest) -> Deferred:
        """Queue a task whose reply comes to this server's reply list."""
        fields, ttl = self._fields(request, None, self.reply_key)
        keys = [tasks.task_key(self.prefix, task_id), tasks.queue_key(self.prefix, request.circle),
                tasks.circle_workers_key(self.prefix, request.circle)]
        d = self._command("eval", tasks.ENQUEUE, keys, [ttl, task_id] + fields)

        def queued(result) -> None:
            if not int(result):
                raise NoWorker("no worker is serving this circle")
            log.debug("queued task {task} for circle {circle} from {source}",
                      task=task_id, circle=request.circle, source=request.source)
        return d.addCallback(queued)

    def _command(self, name: str, *args) -> Deferred:
        """Run a command on the command connection; Redis trouble becomes BackendUnavailable."""
        if self._commands is None or self._commands.size == 0:
            return fail(BackendUnavailable("Redis is unreachable"))
        try:
            d = getattr(self._commands.handler, name)(*args)
        except Exception:
            d = fail()
        return d.addErrback(self._unavailable)

    def _unavailable(self, failure: Failure):
        if failure.check(InvalidData):
            # A value that cannot be encoded (never log it: it may be a script).
            raise ValueError("a task field is not valid UTF-8 text")
        if failure.check(RedisError):
            # Every play fails so while Redis refuses writes (maxmemory): a few lines, with a count.
            self.command_failures += 1
            if worth_logging(self.command_failures):
                log.warn("Redis command failed: {error} ({n} failed commands so far)",
                         error=failure.getErrorMessage(), n=self.command_failures)
            if failure.check(ResponseError) and is_oom(failure.getErrorMessage()):
                self._filled()
                raise BackendFull(FULL)
            raise BackendUnavailable(f"Redis error: {failure.getErrorMessage()}")
        return failure

    # -- timeouts -------------------------------------------------------------------------------

    def _expire(self, task_id: str) -> Deferred:
        """Mark the task expired unless it already ended; fire with its :class:`tasks.Outcome`."""
        now = self.clock.seconds()
        d = self._command("eval", tasks.EXPIRE, [tasks.task_key(self.prefix, task_id)],
                          [tasks.timestamp(now), tasks.STATUS_TTL])
        d.addCallback(lambda r: tasks.Outcome(task_id, *[text(v) for v in r]))
        return d

    def _timed_out(self, task_id: str) -> None:
        entry = self._waiting.get(task_id)
        if entry is None:
            return
        # debug: one line per play a client times out; the session logs it within bounds.
        log.debug("task {task} on circle {circle} timed out after {timeout}s",
                  task=task_id, circle=entry.request.circle, timeout=entry.request.timeout)

        def settled(outcome: Any) -> None:
            if self._waiting.get(task_id) is not entry:
                return  # its reply came meanwhile, or the client left
            if isinstance(outcome, tasks.Outcome) and outcome.status in (tasks.COMPLETED, tasks.ERROR):
                # A worker finished just before the deadline: its reply is already on the reply
                # list (FINISH pushed it in the same step), and routes to this entry.
                entry.timer = self.clock.callLater(REPLY_GRACE, self._gave_up, task_id)
                return
            del self._waiting[task_id]
            entry.deferred.errback(ScriptTimeout())

        self._expire(task_id).addBoth(settled)

    def _gave_up(self, task_id: str) -> None:
        entry = self._waiting.pop(task_id, None)
        if entry is not None:
            entry.deferred.errback(ScriptTimeout())

    def _cancelled(self, task_id: str) -> None:
        """The caller gave up (its connection closed): stop waiting, and expire the task so no
        worker runs a script nobody waits for (once Redis is back, if it is away now)."""
        entry = self._waiting.pop(task_id, None)
        if entry is None:
            return
        entry.stop_timer()
        if self.is_connected():
            self._expire(task_id).addErrback(lambda _: self._abandoned.add(task_id))
        else:
            self._abandoned.add(task_id)

    # -- replies --------------------------------------------------------------------------------

    async def _listen(self) -> None:
        """The one loop reading this server's reply list, for as long as the service runs."""
        while self.running and self._replies is not None and self._commands is not None:
            factory, commands = self._replies, self._commands
            try:
                connection = await factory.getConnection(peek=True)
                # Ready only when commands can be sent too: is_connected() checks both.
                await commands.getConnection(peek=True)
            except RedisError:
                return  # disconnected for good: the service is stopping
            if not self.running:
                return
            if not self._listening:
                self._listening = True
                self.connects += 1
                log.info("connected to Redis at {redis}", redis=reached(self.address, commands))
                self._expire_abandoned()
            try:
                reply = await connection.brpop([self.reply_key], timeout=REPLY_POLL)
            except (RedisError, CancelledError) as e:
                if self._listening:
                    self._listening = False
                    if self.running:
                        log.warn("lost the connection to Redis at {redis} ({error}): plays fail until it is "
                                 "back", redis=reached(self.address, factory), error=str(e))
                self._connection_lost()
                continue
            except Exception:
                log.failure("reading replies")
                continue
            if reply:
                self._route(text(reply[1]))

    def _connection_lost(self) -> None:
        """No reply can arrive now: answer everyone waiting rather than leave them hanging."""
        self.replicas = None  # a new connection may reach another primary
        waiting, self._waiting = self._waiting, {}
        for task_id, entry in waiting.items():
            entry.stop_timer()
            self._abandoned.add(task_id)
            entry.deferred.errback(BackendUnavailable("lost the connection to Redis"))

    def _expire_abandoned(self) -> None:
        abandoned, self._abandoned = self._abandoned, set()
        for task_id in abandoned:
            self._expire(task_id).addErrback(lambda _: None)

    def _route(self, entry: str) -> None:
        try:
            task_id, outcome = tasks.decode_reply(entry)
        except tasks.MalformedReply as e:
            log.warn("ignored a malformed reply on {key}: {why}", key=self.reply_key, why=str(e))
            return
        waiting = self._waiting.pop(task_id, None)
        if waiting is None:
            log.debug("reply for task {task} that nobody waits for (timed out?)", task=task_id)
            return
        waiting.stop_timer()
        if outcome is not None:
            self._settle(waiting.deferred, outcome)
            return
        # A bare task id: the result is in the task hash, read and deleted in one step.
        d = self._command("eval", tasks.TAKE_RESULT, [tasks.task_key(self.prefix, task_id)], [])
        d.addCallback(lambda r: tasks.Outcome(task_id, *[text(v) for v in r]))
        d.addCallbacks(lambda o: self._settle(waiting.deferred, o), waiting.deferred.errback)

    @staticmethod
    def _settle(deferred: Deferred, outcome: tasks.Outcome) -> None:
        if outcome.status == tasks.COMPLETED:
            deferred.callback(outcome.output)
        elif outcome.timed_out:
            deferred.errback(ScriptTimeout(by_worker=True))  # the worker's timeout: answered as ours (-32003)
        elif outcome.status == tasks.ERROR:
            deferred.errback(ScriptFailed(outcome.error, outcome.output))
        else:
            log.warn("task {task} replied with status {status!r}", task=outcome.task_id, status=outcome.status)
            deferred.errback(ScriptFailed(f"the worker replied with status {outcome.status!r}"))
