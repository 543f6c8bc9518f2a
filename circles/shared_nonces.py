"""``RedisNonceStore``: nonces from ``GET /auth/nonce`` that every server process sees.

A nonce issued by one process of a ``--processes`` server, or by one server behind a load
balancer, must authenticate a WebSocket that lands on any other (the processes share one port,
so no affinity at a balancer can help). So a server with Redis keeps these nonces there, one
key each::

    {prefix}nonce:{value}   string "{pubkey}|{owner}" (pubkey: the key it was issued for, empty
                            for any; owner: the asking address), set with SET NX PX, expiring
                            when the client was told it would (``expires_at``)

Redeeming is one atomic ``GETDEL`` (Redis 6.2 or later): the first process to ask takes the
nonce and no other can, so a nonce is single use across every process and every server. The
signature is then checked by the same code as for any nonce (:func:`circles.auth.proved_by`).

Only the server chooses nonce values (128 random bits), and a value that does not have their
form is refused without asking Redis, so a client cannot make keys of its choosing. What a
client can make is bounded by this process's caps, kept in memory (a
:class:`~circles.auth.NonceStore` as the ledger of the nonces this process issued): in all
(``--max-http-nonces``' 10,000, per process) and per client address (``--max-http-nonces-per-ip``,
per process). A ledger entry is freed when the nonce is redeemed in this process or expires; one
redeemed by another process stays counted here until it would have expired. Expiry in Redis is
Redis's own (its clock); the ledger's, and the ``expires_at`` clients are told, the injected
reactor's.

Redis unreachable, not answering within :data:`TIMEOUT` seconds, or full (at its maxmemory):
:meth:`~RedisNonceStore.issue` and :meth:`~RedisNonceStore.redeem_value` fail with
:class:`~circles.backend.scripts.BackendUnavailable` (its ``BackendFull`` when full), which
``/auth/nonce`` answers 503 and the WebSocket upgrade 503. Redeeming needs no memory, so it
works while Redis is full.

A server without Redis (embedded with a script backend of its own) keeps them in memory:
:class:`~circles.auth.NonceStore`, the same interface.
"""

from __future__ import annotations

import math
from typing import Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from txredisapi import RedisError, ResponseError
from zope.interface import implementer

from circles.auth import (AuthenticationFailed, INonceStore, Nonce, NonceStore, TooManyNonces, is_nonce_value,
                          proved_by)
from circles.backend.dispatch import is_oom
from circles.backend.redis import RedisAddress, connect, text
from circles.backend.scripts import BackendFull, BackendUnavailable
from circles.logs import Logger, worth_logging
from circles.once import Once

log = Logger()

#: Seconds a nonce command may wait for Redis (its connection included) before it fails.
TIMEOUT = 5.0


def nonce_key(prefix: str, value: str) -> str:
    return f"{prefix}nonce:{value}"


@implementer(INonceStore)
class RedisNonceStore(Service):
    """Nonces in Redis, on a connection of its own (the script runner's are busy with tasks and
    replies; a handshake should not wait behind a megabyte of output), reconnecting by itself.

    :param address: the Redis the script runner uses.
    :param reactor: connects, and times commands out.
    :param clock: the time of ``expires_at`` and of the ledger's expiry (IReactorTime); default
        the reactor.
    :param ttl: seconds a nonce lives (``--nonce-ttl``).
    :param cap: live nonces this process may have issued (``--max-http-nonces``).
    :param per_owner: of those, to one owner (``--max-http-nonces-per-ip``; 0: no limit).
    :param timeout: seconds a command may wait for Redis.
    """

    def __init__(self, address: RedisAddress, *, reactor, prefix: str, ttl: float, cap: int, per_owner: int = 0,
                 timeout: float = TIMEOUT, clock: Optional[IReactorTime] = None) -> None:
        self.address = address
        self.reactor = reactor
        self.clock: IReactorTime = reactor if clock is None else clock
        self.prefix = prefix
        self.timeout = timeout
        self.ledger = NonceStore(self.clock, ttl, cap, per_owner)  # what this process issued, still live
        self._redis = None  # txredisapi factory, while running
        self._connecting: Optional[Once] = None  # fires once the connection is up, while commands wait for it
        self._give_up = None  # ends that wait, failing it: at its timer (_gives_up), or on stopping
        self._gives_up = None
        self._unreachable = False  # a wait for the connection ran out: fail at once until it is up
        self.failures = 0  # commands that failed (logged: the 1st, 10th, 100th...)

    def startService(self) -> None:
        super().startService()
        self._redis = connect(self.address, self.reactor, reply_timeout=self.timeout)
        # Reaching Redis, and Redis refusing the credentials, are the script runner's to tell.
        self._redis.deferred.addErrback(lambda _: None)

    def stopService(self):
        super().stopService()
        if self._connecting is not None:  # commands waiting for a connection: there will be none
            self._give_up()
        redis, self._redis = self._redis, None
        return None if redis is None else redis.disconnect()

    def live(self) -> int:
        return len(self.ledger)

    def is_connected(self) -> bool:
        """Whether the store's connection to Redis is up now."""
        return self._redis is not None and self._redis.size > 0

    def issue(self, pubkey: Optional[str] = None, owner: Optional[str] = None) -> Deferred:
        try:
            nonce = self.ledger.issue_now(pubkey, owner)
        except TooManyNonces:
            return fail()
        milliseconds = max(1, math.ceil((nonce.expires_at - self.clock.seconds()) * 1000))
        return self._command(lambda reply: self._stored(reply, nonce), "SET", nonce_key(self.prefix, nonce.value),
                             f"{pubkey or ''}|{owner or ''}", "NX", "PX", milliseconds)

    def _stored(self, reply, nonce: Nonce) -> Nonce:
        """Redis's reply to the SET: the nonce, or why not. The ledger counts it unless it is
        surely not in Redis (refused, or never sent); a SET whose reply was lost may have been
        applied, so it stays counted until it would expire: the ledger never counts fewer keys
        than this process made, whatever clients do (a client that leaves before the answer
        included)."""
        if isinstance(reply, Failure):
            if reply.check(ResponseError, BackendUnavailable):
                self.ledger.take(nonce.value)
            return reply
        if text(reply) != "OK":
            # NX found the key taken: 128 random bits met again, which does not happen.
            raise BackendUnavailable("the nonce could not be stored")
        return nonce

    def redeem_value(self, value: str, pubkey: str, signature: str) -> Deferred:
        if not is_nonce_value(value):  # never issued: no need to ask, nor to send its bytes to Redis
            return fail(AuthenticationFailed("nonce unknown, used or expired"))
        d = self._command(lambda stored: self._taken(stored, value), "GETDEL", nonce_key(self.prefix, value))
        d.addCallback(lambda bound: proved_by(value, bound, pubkey, signature))
        return d

    def _taken(self, stored, value: str) -> Optional[str]:
        """Redis's reply to the GETDEL: the key the nonce was issued for (None: any), or why not."""
        if isinstance(stored, Failure):
            return stored
        if stored is None:
            raise AuthenticationFailed("nonce unknown, used or expired")
        self.ledger.take(value)  # frees this process's count of it, if it issued it
        return text(stored).partition("|")[0] or None

    # -- commands ---------------------------------------------------------------------------------

    def _command(self, settle, *args) -> Deferred:
        """What ``settle`` makes of Redis's reply to ``args`` (or of its failure), or
        :class:`BackendUnavailable` (``BackendFull``) within :attr:`timeout` seconds. ``settle``
        runs whenever the reply comes, waited for or not; the Deferred is the caller's to cancel
        (a client gone), the command itself is not (a txredisapi connection matches replies to
        commands in order)."""
        redis = self._redis
        if redis is not None and redis.size:
            self._unreachable = False
        elif redis is None or self._unreachable:
            refused = fail(BackendUnavailable("Redis is unreachable" if redis else "the server is stopping"))
            return refused.addBoth(settle)
        answer: Deferred = Deferred()
        timer = self.reactor.callLater(self.timeout, _too_slow, answer, self.timeout)
        d = ensureDeferred(self._run(redis, args))
        d.addBoth(settle)
        d.addErrback(self._unavailable)
        d.addBoth(_pass_on, answer)
        answer.addBoth(_cancel_timer, timer)
        return answer

    async def _run(self, redis, args: tuple):
        if redis.size == 0:
            await self._connected(redis)
        return await redis.handler.execute_command(*args)

    def _connected(self, redis) -> Deferred:
        """Fires once ``redis`` has a connection, or fails after :attr:`timeout` seconds: one wait
        shared by every command meanwhile, and after it runs out, commands fail at once (no
        waiter piles up) until the connection is back."""
        if self._connecting is None:
            connecting = self._connecting = Once()

            def settled(result) -> None:
                if self._connecting is connecting:
                    self._connecting = None
                    if isinstance(result, Failure):
                        self._unreachable = True
                    if self._gives_up.active():
                        self._gives_up.cancel()
                    connecting.fire(result)

            self._give_up = lambda: settled(Failure(BackendUnavailable("Redis is unreachable")))
            self._gives_up = self.reactor.callLater(self.timeout, self._give_up)
            try:
                redis.getConnection(peek=True).addBoth(settled)
            except RedisError:
                self._give_up()
        return self._connecting.when()

    def _unavailable(self, failure: Failure):
        if failure.check(BackendUnavailable):
            return failure
        if failure.check(RedisError):
            message = failure.getErrorMessage()
            self.failures += 1
            if worth_logging(self.failures):
                hint = " (taking a nonce needs GETDEL: Redis 6.2 or later)" if "unknown command" in message else ""
                log.warn("Redis could not issue or take a nonce: {error}{hint} ({n} failed so far)", error=message,
                         hint=hint, n=self.failures)
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


def _pass_on(result, to: Deferred) -> None:
    if to.called:  # timed out or cancelled: nobody waits
        return None
    if isinstance(result, Failure):
        to.errback(result)
    else:
        to.callback(result)
    return None
