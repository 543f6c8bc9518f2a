"""``RedisRunner``: what a script runner on Redis holds, whatever its worker protocol.

One runner per server process, with two Redis connections whatever the load: one for commands
(pipelined by txredisapi) and one that blocks (a ``BRPOP`` on a reply list, or a subscription
to Redis's notifications), read by one loop for as long as the service runs (:meth:`_read`,
each protocol's own); a third, with ``ack_replicas``, writes webhook events and ``WAIT``s
(:mod:`circles.backend.replica_acks`). The runners of both kinds are its subclasses:
:class:`~circles.backend.dispatch.RedisScriptRunner` (our protocol) and
:class:`~circles.backend.job_dispatch.JobScriptRunner` (a dispatcher's job schema).

Failure policy: while either connection is down, a play and a webhook event fail at once with
:class:`BackendUnavailable` (nothing is queued); plays waiting when the blocking connection
drops fail the same way, and their tasks are stopped once Redis is back. Reconnection is
automatic. :mod:`circles.backend.health` says whether a connected Redis answers, is still the
primary, and has room (a Redis at its ``maxmemory`` makes the runner *full*: :class:`BackendFull`).
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from txredisapi import InvalidData, RedisError, ResponseError

from circles.backend.embedded import START_TIMEOUT
from circles.backend.health import FULL, Health, is_oom
from circles.backend.reachability import Reachability
from circles.backend.redis import connect, reached
from circles.backend.redis_url import RedisAddress
from circles.backend.replica_acks import ReplicaAcks
from circles.backend.replies import Replies
from circles.backend.scripts import BackendFull, BackendUnavailable
from circles.backend.txredisapi_patches import drop_connections, live_connection
from circles.common.logs import Logger, worth_logging

log = Logger()

#: Seconds a command may wait for Redis before the connection is considered dead and reset.
COMMAND_TIMEOUT = 10.0


class RedisRunner(Service):
    """Connections, health and replica acknowledgements of a script runner on Redis.

    :param address: where Redis is (see :func:`circles.backend.redis_url.parse_redis_url`).
    :param reactor: provides IReactorTime (deadlines, timestamps) and connects.
    :param prefix: prepended to the keys of ours (the runner's probe key, webhook events' seen keys).
    :param server_id: names this process's keys (a reply list, a probe); random by default. Two
        live servers must never share one.
    :param private_redis: ``address`` is the server's own private Redis, which it starts (so it
        may take a while to answer, and what to check is its ``--state-dir``), not a URL given.
    :param ack_replicas: replicas that must hold a webhook event's task before it is answered
        (Redis ``WAIT``), within ``ack_timeout`` seconds; 0: the primary is enough.

    A subclass sets :attr:`replies` (the plays waiting) before calling ``__init__``, and
    :attr:`housekeeping` (its served circles' numbers, read in rounds while it runs), and
    implements :meth:`_read`.
    """

    replies: Replies
    housekeeping: Any  # started and stopped with the runner: .start(), .stop()
    #: The blocking connection is a subscriber (txredisapi's pub/sub protocol), calling
    #: :meth:`_message` for each message.
    subscriber = False

    def __init__(self, address: RedisAddress, *, reactor, prefix: str, server_id: str | None = None,
                 private_redis: bool = False, ack_replicas: int = 0, ack_timeout: float = 1.0) -> None:
        self.address = address
        self.private_redis = private_redis
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.prefix = prefix
        self.server_id = server_id or secrets.token_hex(8)
        self._commands: Any = None  # txredisapi factory: pipelined commands
        self._replies: Any = None  # txredisapi factory: the one blocking connection (replies or notifications)
        self._acks = None  # txredisapi factory: the one connection that writes and WAITs (ack_replicas > 0)
        self._listening = False  # the blocking connection is read on a live connection
        self._loop: Deferred | None = None
        self.connects = 0  # times both connections came up (for metrics: reconnects)
        self.command_failures = 0  # commands Redis answered with an error (logged: the 1st, 10th, 100th...)
        self.health = Health(address, reactor, lambda: self._commands,
                             replicated=bool(address.sentinels) or ack_replicas > 0,  # health by ROLE, not PING
                             probe_key=f"{prefix}probe:{self.server_id}", drop_connections=self._drop_connections,
                             room_again=lambda: self.replies.expire_abandoned())
        self.acks = ReplicaAcks(ack_replicas, ack_timeout, lambda: self._acks, lambda: self.health.replicas,
                                self.health.filled)

    # -- service --------------------------------------------------------------------------------

    def _describe(self) -> str:
        """What the runner dispatches through, for its first line in the log."""
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        log.info("script dispatch through Redis at {redis}, {how}", redis=self.address.where(), how=self._describe())
        watch = Reachability(self.address, self.reactor, private=self.private_redis,
                             starting=START_TIMEOUT if self.private_redis else 0.0)
        self._commands = connect(self.address, self.reactor, reply_timeout=COMMAND_TIMEOUT, watch=watch)
        self._replies = connect(self.address, self.reactor, watch=watch,
                                on_message=self._message if self.subscriber else None)
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
        Redis is there to be told, and close the connections."""
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        super().stopService()
        self.housekeeping.stop()
        self.health.stop()
        waiting = self.replies.stop("the server is shutting down")
        if self.is_connected():
            # Best effort, so no worker runs a script nobody waits for any more.
            await DeferredList([self.replies.expire(task_id, "the server is shutting down") for task_id in waiting],
                               consumeErrors=True)
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
        """Whether a task can be queued and its result received right now."""
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

    # -- commands -------------------------------------------------------------------------------

    def command(self, name: str, *args) -> Deferred:
        """Run a Redis command on the runner's command connection, for the parts composed with
        it (a server's init scripts: :mod:`circles.backend.init_scripts`); Redis trouble fails
        it with :class:`BackendUnavailable`."""
        return self._command(name, *args)

    def _command(self, name: str, *args) -> Deferred:
        """Run a command on the command connection; Redis trouble becomes BackendUnavailable."""
        # On the connection itself, not through the factory's handler (two Deferreds more a command).
        connection = live_connection(self._commands) if self._commands is not None else None
        if connection is None:
            return fail(BackendUnavailable("Redis is unreachable"))
        try:
            d = getattr(connection, name)(*args)
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

    # -- the blocking connection ------------------------------------------------------------------

    async def _read(self, connection: Any) -> None:
        """Read once on the blocking connection (a RedisError or CancelledError: it is lost)."""
        raise NotImplementedError

    def _message(self, pattern: str | None, channel: str, message: str) -> None:
        """A message on the blocking connection, when it is a :attr:`subscriber`."""

    def _connected_again(self) -> None:
        """Both connections are up again (or for the first time)."""
        self.replies.expire_abandoned()

    async def _listen(self) -> None:
        """The one loop reading the blocking connection, for as long as the service runs."""
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
            try:
                if not self._listening:
                    await self._connecting(connection)
                    self._listening = True
                    self.connects += 1
                    log.info("connected to Redis at {redis}", redis=reached(self.address, commands))
                    self._connected_again()
                await self._read(connection)
            except (RedisError, CancelledError) as e:
                if self._listening:
                    self._listening = False
                    if self.running:
                        log.warn("lost the connection to Redis at {redis} ({error}): plays fail until it is "
                                 "back", redis=reached(self.address, factory), error=str(e))
                self._connection_lost()
                continue
            except Exception:
                log.failure("reading Redis")
                await deferLater(self.clock, 1.0, lambda: None)  # not at once: the same again, in a loop
                continue

    async def _connecting(self, connection: Any) -> None:
        """Make a new blocking connection ready, before plays are taken (a subscription)."""

    def _connection_lost(self) -> None:
        """Nothing can arrive now: answer everyone waiting rather than leave them hanging."""
        self.health.replicas = None  # a new connection may reach another primary
        self.replies.lost()
