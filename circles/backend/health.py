"""Whether the Redis a :class:`~circles.backend.dispatch.RedisScriptRunner` uses answers, is still
the primary, and has room: its health loop (:class:`Health`).

A Redis that is connected but does not answer (stopped, swapping, wedged) is not up: a PING goes
out every :data:`PING_INTERVAL` seconds on the command connection, one at a time (never a second
while the first waits), and once one has waited :data:`PING_TIMEOUT` seconds the backend counts
as unavailable until one is answered.

Replicated Redis (``redis+sentinel://``, or replica acknowledgements asked for): the health check
is ``ROLE`` instead of PING. A node that is no longer the primary has its connections dropped,
so they reconnect to the one the Sentinels name; ``ROLE`` also counts the primary's replicas
(:attr:`Health.replicas`).

A Redis at its ``maxmemory`` (``noeviction``) refuses writes with ``OOM command not allowed``:
the runner is then *full* (:meth:`Health.filled`) until the health loop finds room again: while
full it sends a small write (``SET`` of a key of its own, expiring at once) instead of its PING,
and the first one Redis takes ends it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from txredisapi import ResponseError

from circles.backend.redis import reached
from circles.backend.redis_url import RedisAddress
from circles.backend.values import text
from circles.common.logs import Logger

log = Logger()

#: Seconds between health PINGs, and how long one may go unanswered before Redis counts as down.
PING_INTERVAL = 1.0
PING_TIMEOUT = 2.0
#: What a play or webhook event refused by a full Redis is told.
FULL = "Redis is full (maxmemory): nothing was queued; retry later"
#: Milliseconds the health loop's write, sent while Redis is full, lives.
PROBE_TTL_MS = 2000


def is_oom(message: str) -> bool:
    """Whether a Redis error reply says it is at its maxmemory (a write refused, noeviction)."""
    return message.startswith("OOM") or "OOM command not allowed" in message


class Health:
    """The health loop of one runner's Redis.

    :param commands: the runner's command connection now (a txredisapi factory), or None.
    :param replicated: ask ``ROLE`` instead of PING (a replicated Redis).
    :param probe_key: the key the loop's write sets while Redis is full.
    :param drop_connections: close every connection of the runner: they reconnect to where the
        Sentinels say the primary is now.
    :param room_again: called when a full Redis takes a write again.
    """

    def __init__(self, address: RedisAddress, clock: IReactorTime, commands: Callable[[], Any | None], *,
                 replicated: bool, probe_key: str, drop_connections: Callable[[], None],
                 room_again: Callable[[], None]) -> None:
        self.address = address
        self.clock = clock
        self._commands = commands
        self.replicated = replicated
        self.probe_key = probe_key
        self._drop_connections = drop_connections
        self._room_again = room_again
        self._pinger: LoopingCall | None = None
        self._ping_sent: float | None = None  # when the outstanding PING went out; None: none is
        self.pings = 0  # PINGs sent
        self.answering = True  # False once a PING has waited PING_TIMEOUT, until one is answered
        self.full = False  # Redis refused a write at its maxmemory; until the health loop's write is taken
        self.replicas: int | None = None  # replicas the primary has, as ROLE last said; None: unknown

    def start(self) -> None:
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.clock
        self._pinger.start(PING_INTERVAL, now=False)

    def stop(self) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()

    def filled(self) -> None:
        """Redis refused a write at its maxmemory: nothing is queued until it has room again."""
        if not self.full:
            self.full = True
            log.warn("Redis is full (at its maxmemory): plays get -32004 and webhook events 503 until it has room")

    def _ping(self) -> None:
        if self._ping_sent is not None:
            waited = self.clock.seconds() - self._ping_sent
            if self.answering and waited >= PING_TIMEOUT:
                self.answering = False
                log.warn("Redis has not answered a PING for {seconds:.0f}s: plays fail until it does",
                         seconds=waited)
            return  # one PING at a time: never pile them up behind a Redis that does not answer
        commands = self._commands()
        if commands is None or commands.size == 0:
            return
        self._ping_sent = self.clock.seconds()
        self.pings += 1
        probe = self.full  # full: only a write tells whether Redis takes writes again
        try:
            if probe:
                d = commands.handler.execute_command("SET", self.probe_key, "1", "PX", PROBE_TTL_MS)
            else:
                d = commands.handler.role() if self.replicated else commands.handler.ping()
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
        self._room_again()

    def _primary_says(self, role: list) -> bool:
        """Whether ``ROLE`` came from a primary; if so, note its replicas. A node that is no
        longer the primary (demoted by a failover) has every connection dropped: they
        reconnect to where the Sentinels say the primary is now."""
        if role and text(role[0]) == "master":
            self.replicas = len(role[2]) if len(role) > 2 and isinstance(role[2], list) else 0
            return True
        self.replicas = None
        log.warn("Redis at {redis} is no longer the primary (its role is {role}): reconnecting",
                 redis=reached(self.address, self._commands()), role=text(role[0]) if role else "unknown")
        if not self.address.sentinels:
            self.answering = False  # a redis:// URL cannot name another node: fail until it is primary again
            return False
        self._drop_connections()
        return False
