"""``RedisScriptRunner``: hands scripts to circle workers through Redis and relays the result.

One runner per server process (a :class:`~circles.backend.runner.RedisRunner`). It holds two Redis
connections whatever the load: one for commands (pipelined by txredisapi) and one that blocks in
``BLMPOP`` on this server's reply list, taking up to :data:`REPLY_BATCH` replies at a time (as many
as are there: under load one round trip brings many), and routes each reply to the request waiting
for it, by task id (:mod:`circles.backend.replies`).
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
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from circles.backend import tasks
from circles.backend.housekeeping import Housekeeping
from circles.backend.members import members_key, policy_key
from circles.backend.redis_url import RedisAddress
from circles.backend.replies import Replies
from circles.backend.runner import RedisRunner
from circles.backend.scripts import IAdmittingScriptRunner, NotAMember, NoWorker, Queued, ScriptRequest
from circles.backend.values import text
from circles.common.event_loop import TurnEnd
from circles.common.ids import random_uuid
from circles.common.logs import Logger
from circles.common.logs import enabled as log_enabled

log = Logger()

#: BLMPOP's own timeout on the reply list: bounds how long a silently dead connection goes unnoticed.
REPLY_POLL = 5
#: The most replies one BLMPOP takes (the oldest first).
REPLY_BATCH = 128


@implementer(IAdmittingScriptRunner)
class RedisScriptRunner(RedisRunner):
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
    alone still answers the plays of a dead worker and re-queues its webhook tasks. Its
    connections, health and replica acknowledgements are :class:`~circles.backend.runner.RedisRunner`'s.
    """

    def __init__(self, address: RedisAddress, *, reactor, prefix: str = tasks.DEFAULT_PREFIX,
                 server_id: str | None = None, task_ttl: int = tasks.TASK_TTL,
                 max_output: int | None = None, private_redis: bool = False,
                 ack_replicas: int = 0, ack_timeout: float = 1.0, circles=frozenset(),
                 webhook_attempts: int = tasks.DEFAULT_ATTEMPTS) -> None:
        super().__init__(address, reactor=reactor, prefix=prefix, server_id=server_id, private_redis=private_redis,
                         ack_replicas=ack_replicas, ack_timeout=ack_timeout)
        self.reply_key = tasks.reply_key(prefix, self.server_id)
        self.task_ttl = task_ttl
        self.max_output = max_output
        self.webhook_attempts = webhook_attempts
        self._enqueues: list[tuple] = []  # plays to queue at the end of this turn: (task id, request, admit, deadline)
        self._turn_end = TurnEnd(reactor)
        self.replies = Replies(reactor, prefix, self.reply_key, self._command, self.is_connected)
        self.housekeeping = Housekeeping(reactor, prefix, lambda: self._commands, self._command, self.is_connected,
                                         circles)

    def _describe(self) -> str:
        return f"reply list {self.reply_key}"

    # -- API ------------------------------------------------------------------------------------

    def run(self, request: ScriptRequest) -> Deferred:
        """Queue ``request`` for the circle's workers; fire with the output text, or fail with
        :class:`ScriptTimeout`, :class:`ScriptFailed` or :class:`BackendUnavailable`."""
        return self._run(request, admit=False)

    def run_admitted(self, request: ScriptRequest) -> Deferred:
        """:meth:`run`, queued only if the circle's policy lets the caller play (else
        :class:`~circles.backend.scripts.NotAMember`): read in the queuing step itself."""
        return self._run(request, admit=True)

    def _run(self, request: ScriptRequest, admit: bool) -> Deferred:
        if not self.is_connected():
            return fail(self._refusal())
        task_id = random_uuid()
        result = self.replies.wait(task_id, request)
        self._write(task_id, request, admit)
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
        task_id = random_uuid()
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

    def _write(self, task_id: str, request: ScriptRequest, admit: bool) -> None:
        """Queue a task whose reply comes to this server's reply list (``admit``: if the circle's
        policy lets its caller play), with the other plays of this turn of the reactor; a play
        that is not queued fails (:meth:`Replies.not_queued`)."""
        self._enqueues.append((task_id, request, admit, tasks.timestamp(self.clock.seconds() + request.timeout)))
        if len(self._enqueues) == 1:
            self._turn_end.callLater(0, self._send_enqueues)

    def _send_enqueues(self) -> None:
        """The plays of this turn of the reactor, queued in one step (Redis trouble fails each as
        it would fail one)."""
        batch, self._enqueues = self._enqueues, []
        # A play given up on meanwhile (its client left in this same turn) was expired already, on
        # a task not written yet: it is not written now either.
        batch = [entry for entry in batch if self.replies.waits_for(entry[0])]
        if batch:
            self._enqueue(batch)

    def _queued(self, task_id: str, request: ScriptRequest, result: Any) -> None:
        """ENQUEUE's answer for one play: one refused (not a member, no live worker) fails now."""
        try:
            if int(result[0]) < 0:
                raise NotAMember(text(result[1]))
            if not int(result[0]):
                raise NoWorker("no worker is serving this circle")
        except Exception:
            self.replies.not_queued(task_id, Failure())
            return
        if log_enabled(LogLevel.debug):
            log.debug("queued task {task} for circle {circle} from {source}",
                      task=task_id, circle=request.circle, source=request.source)

    def _enqueue(self, batch: list) -> None:
        """One ENQUEUE for ``batch``: what its tasks share (their circles' keys, the reply list,
        the status and timestamps) is sent once."""
        now = tasks.timestamp(self.clock.seconds())
        shared = ["reply_to", self.reply_key, "status", tasks.PENDING, "output", "", "error", "",
                  "created_at", now, "updated_at", now]
        if self.max_output is not None:
            shared += ["max_output", str(self.max_output)]
        circles: dict[str, int] = {}
        keys: list = []
        plays: list = []
        for task_id, request, admit, deadline in batch:
            circle = request.circle
            number = circles.get(circle)
            if number is None:
                number = circles[circle] = len(circles) + 1
                keys += [tasks.queue_key(self.prefix, circle), tasks.circle_workers_key(self.prefix, circle),
                         policy_key(self.prefix, circle), members_key(self.prefix, circle)]
            plays += [number, math.ceil(request.timeout) + self.task_ttl, task_id, "1" if admit else "",
                      request.caller, request.script, request.source, deadline]
        keys += [tasks.task_key(self.prefix, task_id) for task_id, *_ in batch]
        sent = self._command("eval", tasks.ENQUEUE, keys, [len(circles), *circles, len(shared), *shared, *plays])

        def each(results: list) -> None:
            for (task_id, request, *_), result in zip(batch, results):
                self._queued(task_id, request, result)

        def failed(failure: Failure) -> None:
            if failure.check(ValueError) and len(batch) > 1:
                # A field that cannot be sent (not UTF-8): each on its own, so that only its play fails.
                for entry in batch:
                    self._enqueue([entry])
                return
            for task_id, *_ in batch:
                self.replies.not_queued(task_id, failure)

        sent.addCallbacks(each, failed)

    # -- the reply list -------------------------------------------------------------------------

    async def _read(self, connection: Any) -> None:
        """One BLMPOP on this server's reply list; each reply goes to the play waiting for it."""
        reply = await connection.execute_command("BLMPOP", REPLY_POLL, 1, self.reply_key, "RIGHT", "COUNT",
                                                 REPLY_BATCH, apply_timeout=False)
        if reply:
            for entry in reply[1]:
                self.replies.route(text(entry))
