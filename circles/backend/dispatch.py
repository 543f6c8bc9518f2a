"""``RedisScriptRunner``: hands scripts to circle workers through Redis and relays the result.

One runner per server process. It holds two Redis connections whatever the load: one for
commands (pipelined by txredisapi) and one that blocks in ``BRPOP`` on this server's reply list
and routes each reply to the request waiting for it, by task id (:mod:`circles.backend.replies`).
``docs/worker-protocol.md`` describes what a worker sees.

Failure policy: while either connection is down, :meth:`~RedisScriptRunner.run` and
:meth:`~RedisScriptRunner.enqueue_once` fail at once with :class:`BackendUnavailable` (nothing is
queued); requests waiting for a reply when the reply connection drops fail the same way, and
their tasks are marked ``expired`` once Redis is back so they do not run for nobody.
Reconnection is automatic. A :meth:`~RedisScriptRunner.run` whose Deferred is cancelled (its
client disconnected) is forgotten and its task expired the same way.

The parts it composes:

- :mod:`circles.backend.health`: a Redis that is connected but does not answer PING (or ``ROLE``,
  replicated) within :data:`~circles.backend.health.PING_TIMEOUT` is not up either (``/ready``
  503, plays -32004 at once) until it answers; a node no longer the primary has its connections
  dropped, so a failover is the same as a lost connection (plays waiting fail -32004 at once,
  their tasks are expired on the new primary, and replies are read from the new primary's reply
  list); a Redis at its ``maxmemory`` makes the runner *full* (:class:`BackendFull`: plays -32004
  saying so, webhooks 503, ``/ready`` 503 with the reason) and nothing is queued, without asking
  Redis, until the health loop finds room again.
- :mod:`circles.backend.replies`: the plays waiting for their reply, their deadlines, and the
  routing of each reply.
- :mod:`circles.backend.replica_acks`: with ``ack_replicas``, :meth:`~RedisScriptRunner.enqueue_once`
  answers only once that many replicas hold the task (``WAIT``, shared by concurrent events),
  and fails at once while fewer are connected.
- :mod:`circles.backend.housekeeping`: reaping lost workers, and the served circles' numbers.
"""

from __future__ import annotations

import math
import secrets
import uuid
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from txredisapi import InvalidData, RedisError, ResponseError
from zope.interface import implementer

from circles.backend import tasks
from circles.backend.embedded import START_TIMEOUT
from circles.backend.health import FULL, Health, is_oom
from circles.backend.housekeeping import Housekeeping
from circles.backend.reachability import Reachability
from circles.backend.redis import connect, reached
from circles.backend.redis_url import RedisAddress
from circles.backend.replica_acks import ReplicaAcks
from circles.backend.replies import Replies
from circles.backend.scripts import BackendFull, BackendUnavailable, IScriptRunner, NoWorker, Queued, ScriptRequest
from circles.backend.txredisapi_patches import drop_connections
from circles.backend.values import text
from circles.common.logs import Logger, worth_logging

log = Logger()

#: BRPOP's own timeout on the reply list: bounds how long a silently dead connection goes unnoticed.
REPLY_POLL = 5
#: Seconds a command may wait for Redis before the connection is considered dead and reset.
COMMAND_TIMEOUT = 10.0


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
        reads every :data:`~circles.backend.tasks.HEARTBEAT_INTERVAL` seconds
        (:attr:`Housekeeping.circle_stats <circles.backend.housekeeping.Housekeeping.circle_stats>`,
        for ``/metrics``); empty: none (a server of any circle has no bounded set to report).
    :param webhook_attempts: the runs a webhook task gets (its ``max_attempts``) when workers
        running it are lost; past them it is dead-lettered.

    Every :data:`~circles.backend.tasks.HEARTBEAT_INTERVAL` seconds the runner also reaps the
    workers whose heartbeat lapsed (as workers do, :mod:`circles.backend.housekeeping`): a server
    alone still answers the plays of a dead worker and re-queues its webhook tasks.
    """

    def __init__(self, address: RedisAddress, *, reactor, prefix: str = tasks.DEFAULT_PREFIX,
                 server_id: str | None = None, task_ttl: int = tasks.TASK_TTL,
                 max_output: int | None = None, private_redis: bool = False,
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
        self.webhook_attempts = webhook_attempts
        self._commands: Any = None  # txredisapi factory: pipelined commands
        self._replies = None  # txredisapi factory: the one blocking BRPOP connection
        self._acks = None  # txredisapi factory: the one connection that writes and WAITs (ack_replicas > 0)
        self._listening = False  # a BRPOP on the reply list is in flight on a live connection
        self._loop: Deferred | None = None
        self.connects = 0  # times both connections came up (for metrics: reconnects)
        self.command_failures = 0  # commands Redis answered with an error (logged: the 1st, 10th, 100th...)
        self.replies = Replies(reactor, prefix, self.reply_key, self._command, self.is_connected)
        self.health = Health(address, reactor, lambda: self._commands,
                             replicated=bool(address.sentinels) or ack_replicas > 0,  # health by ROLE, not PING
                             probe_key=f"{prefix}probe:{self.server_id}", drop_connections=self._drop_connections,
                             room_again=self.replies.expire_abandoned)
        self.acks = ReplicaAcks(ack_replicas, ack_timeout, lambda: self._acks, lambda: self.health.replicas,
                                self.health.filled)
        self.housekeeping = Housekeeping(reactor, prefix, lambda: self._commands, self._command, self.is_connected,
                                         circles)

    # -- service --------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        log.info("script dispatch through Redis at {redis}, reply list {reply}",
                 redis=self.address.where(), reply=self.reply_key)
        watch = Reachability(self.address, self.reactor, private=self.private_redis,
                             starting=START_TIMEOUT if self.private_redis else 0.0)
        self._commands = connect(self.address, self.reactor, reply_timeout=COMMAND_TIMEOUT, watch=watch)
        self._replies = connect(self.address, self.reactor, watch=watch)
        if self.acks.replicas:
            log.info("webhook events are answered once {n} Redis replica(s) hold them (within {timeout}s)",
                     n=self.acks.replicas, timeout=self.acks.timeout)
            # A write sent while a WAIT blocks the connection is answered after it.
            self._acks = connect(self.address, self.reactor, reply_timeout=COMMAND_TIMEOUT + self.acks.timeout,
                                 watch=watch)
        self._loop = ensureDeferred(self._listen())
        self.health.start()
        self.housekeeping.start()

    def stopService(self) -> Deferred:
        """Answer the plays still waiting (:class:`BackendUnavailable`), expire their tasks if
        Redis is there to be told, and close both connections."""
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        super().stopService()
        self.health.stop()
        self.housekeeping.stop()
        waiting = self.replies.stop("the server is shutting down")
        if self.is_connected():
            # Best effort, so no worker runs a script nobody waits for any more.
            await DeferredList([self.replies.expire(task_id) for task_id in waiting], consumeErrors=True)
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
        return len(self.replies)

    @property
    def full(self) -> bool:
        """Redis refused a write at its maxmemory, and has not taken the health loop's since
        (``/ready`` says so: :meth:`circles.server.gateway.Gateway.unready_reason`)."""
        return self.health.full

    @property
    def awaiting_replicas(self) -> int:
        """webhook events written (or being written) and waiting for replicas to acknowledge them."""
        return self.acks.waiting

    def is_connected(self) -> bool:
        """Whether a task can be queued and its reply received right now."""
        return (self._listening and self.health.answering and not self.health.full and self._commands is not None
                and self._commands.size > 0)

    def _refusal(self) -> BackendUnavailable:
        """Why nothing can be queued now (``is_connected()`` is false)."""
        if self.health.full and self._listening and self.health.answering:
            return BackendFull(FULL)
        if not self.running:  # stopped: the server is shutting down, whatever Redis does
            return BackendUnavailable("the server is shutting down")
        return BackendUnavailable("Redis is unreachable")

    def _drop_connections(self) -> None:
        """Close every connection: they reconnect to where the Sentinels say the primary is now."""
        for factory in (self._commands, self._replies, self._acks):
            drop_connections(factory)

    # -- API ------------------------------------------------------------------------------------

    def run(self, request: ScriptRequest) -> Deferred:
        """Queue ``request`` for the circle's workers; fire with the output text, or fail with
        :class:`ScriptTimeout`, :class:`ScriptFailed` or :class:`BackendUnavailable`."""
        if not self.is_connected():
            return fail(self._refusal())
        task_id = str(uuid.uuid4())
        result = self.replies.wait(task_id, request)
        self._write(task_id, request).addErrback(lambda failure: self.replies.not_queued(task_id, failure))
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
        if self.acks.replicas:
            d = ensureDeferred(self.acks.enqueue_once(keys, args))
        else:
            d = self._command("eval", tasks.ENQUEUE_ONCE, keys, args)

        def done(result) -> Queued:
            queued = Queued(text(result[1]), duplicate=not int(result[0]))
            log.debug("{what} task {task} for circle {circle} from {source}",
                      what="already queued:" if queued.duplicate else "queued",
                      task=queued.task_id, circle=request.circle, source=request.source)
            return queued

        return d.addCallback(done)

    # -- writing tasks --------------------------------------------------------------------------

    def _fields(self, request: ScriptRequest, data_json: str | None, reply_to: str) -> tuple[list, int]:
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

    def command(self, name: str, *args) -> Deferred:
        """Run a Redis command on the runner's command connection, for the parts composed with
        it (a server's init scripts: :mod:`circles.backend.init_scripts`); Redis trouble fails
        it with :class:`BackendUnavailable`."""
        return self._command(name, *args)

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
                self.health.filled()
                raise BackendFull(FULL)
            raise BackendUnavailable(f"Redis error: {failure.getErrorMessage()}")
        return failure

    # -- the reply list -------------------------------------------------------------------------

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
                self.replies.expire_abandoned()
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
                self.replies.route(text(reply[1]))

    def _connection_lost(self) -> None:
        """No reply can arrive now: answer everyone waiting rather than leave them hanging."""
        self.health.replicas = None  # a new connection may reach another primary
        self.replies.lost()
