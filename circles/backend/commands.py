"""``CommandConnection``: a Redis connection of its own for the short commands a client waits on.

A play's membership check (:mod:`circles.backend.members`) and a URL authentication's nonce
(:mod:`circles.server.access.redis_nonces`) each ask Redis one short question while a client waits. They do
not use the script runner's connections, busy with tasks and replies (a handshake should not
wait behind a megabyte of output); each service has a connection of its own, reconnecting by
itself, and this class is what they share:

- a command fails within its ``timeout`` seconds, the wait for the connection included, with
  :class:`~circles.backend.scripts.BackendUnavailable` (``BackendFull`` when Redis is at its
  maxmemory), which callers answer -32004 or 503: never a traceback, never a hang;
- the connection may come up a moment after the script runner's (at start, or after Redis came
  back): commands meanwhile share one wait for it, and once a wait has run out, commands fail
  at once until the connection is up again, so no waiter piles up while Redis is away;
- a command's reply is settled whenever it comes, waited for or not (a caller that keeps count
  of what it wrote must learn of a write whose client left), while the caller's Deferred is its
  own to cancel: the command itself never is (a txredisapi connection matches replies to
  commands in order);
- errors Redis answers are logged with a budget (the 1st, 10th, 100th...).

Time is the ``reactor`` attribute's (an ``IReactorTime``), so tests can drive it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from txredisapi import RedisError

from circles.backend.health import is_oom
from circles.backend.redis import connect
from circles.backend.redis_url import RedisAddress
from circles.backend.scripts import BackendFull, BackendUnavailable
from circles.common.logs import Logger, worth_logging
from circles.common.once import Once, pass_on

log = Logger()

#: Seconds a command may wait for Redis (its connection included) when not told otherwise.
TIMEOUT = 5.0


class CommandConnection(Service):
    """A service holding one Redis connection for short commands (:meth:`command`).

    :param address: the Redis the script runner uses.
    :param reactor: connects, and times commands out (its IReactorTime).
    :param timeout: seconds a command may wait for Redis, its connection included.
    :param doing: what the commands do, for the log ("say who may play").
    """

    def __init__(self, address: RedisAddress, *, reactor, timeout: float = TIMEOUT, doing: str) -> None:
        self.address = address
        self.reactor = reactor
        self.timeout = timeout
        self.doing = doing
        self._redis: Any = None  # txredisapi factory, while running
        self._connecting: Once | None = None  # fires once the connection is up, while commands wait for it
        self._give_up: Callable[[], None] | None = None  # ends that wait, failing it (its timer, or stopping)
        self._gives_up: IDelayedCall | None = None  # the timer of _give_up
        self._unreachable = False  # a wait for the connection ran out: fail at once until it is up
        self.failures = 0  # commands Redis answered with an error (logged: the 1st, 10th, 100th...)

    def startService(self) -> None:
        super().startService()
        self._redis = connect(self.address, self.reactor, reply_timeout=self.timeout)
        # Reaching Redis, and Redis refusing the credentials, are the script runner's to tell.
        self._redis.deferred.addErrback(lambda _: None)

    def stopService(self):
        super().stopService()
        # Commands waiting for a connection: there will be none.
        if self._connecting is not None and self._give_up is not None:
            self._give_up()
        redis, self._redis = self._redis, None
        return None if redis is None else redis.disconnect()

    def is_connected(self) -> bool:
        """Whether the connection to Redis is up now."""
        return self._redis is not None and self._redis.size > 0

    def command(self, ask: Callable[[Any], Any], settle: Callable[[Any], Any] | None = None,
                hint: str = "") -> Deferred:
        """What ``settle`` makes of the reply of ``ask(connection)`` (a Deferred or coroutine of
        a Redis reply), or of its failure; or :class:`BackendUnavailable` (``BackendFull``) within
        :attr:`timeout` seconds. ``hint`` is added to the log line when Redis does not know the
        command (say which Redis version it needs)."""
        redis = self._redis
        if redis is not None and redis.size:
            self._unreachable = False
        elif redis is None or self._unreachable:
            refused = fail(BackendUnavailable("Redis is unreachable" if redis else "the server is stopping"))
            return refused if settle is None else refused.addBoth(settle)
        answer: Deferred = Deferred()
        timer = self.reactor.callLater(self.timeout, _too_slow, answer, self.timeout)
        d = ensureDeferred(self._run(redis, ask))
        # Callbacks, not a second coroutine: per command, and a membership check is one per play (the hot path).
        if settle is not None:
            d.addBoth(settle)
        d.addErrback(self._unavailable, hint)
        d.addBoth(pass_on, answer)
        answer.addBoth(_cancel_timer, timer)
        return answer

    async def _run(self, redis, ask):
        if redis.size == 0:
            await self._connected(redis)
        return await ask(redis.handler)

    def _connected(self, redis) -> Deferred:
        """Fires once ``redis`` has a connection, or fails after :attr:`timeout` seconds: one wait
        shared by every command meanwhile."""
        if self._connecting is None:
            connecting = self._connecting = Once()

            def settled(result) -> None:
                if self._connecting is connecting:
                    self._connecting = None
                    if isinstance(result, Failure):
                        self._unreachable = True
                    if self._gives_up is not None and self._gives_up.active():
                        self._gives_up.cancel()
                    connecting.fire(result)

            self._give_up = lambda: settled(Failure(BackendUnavailable("Redis is unreachable")))
            self._gives_up = self.reactor.callLater(self.timeout, self._give_up)
            try:
                redis.getConnection(peek=True).addBoth(settled)
            except RedisError:
                self._give_up()
        return self._connecting.when()

    def _unavailable(self, failure: Failure, hint: str):
        if failure.check(BackendUnavailable):
            return failure
        if failure.check(RedisError):
            message = failure.getErrorMessage()
            self.failures += 1
            if worth_logging(self.failures):
                log.warn("Redis could not {doing}: {error}{hint} ({n} failed so far)", doing=self.doing, error=message,
                         hint=hint if "unknown command" in message else "", n=self.failures)
            if is_oom(message):
                raise BackendFull("Redis is full (maxmemory)")
            raise BackendUnavailable(f"Redis error: {message}")
        return failure


def _too_slow(answer: Deferred, seconds: float) -> None:
    if not answer.called:
        answer.errback(BackendUnavailable(f"Redis did not answer within {seconds:g}s"))


def _cancel_timer(result, timer):
    if timer.active():
        timer.cancel()
    return result

