"""``RedisNonceStore``: nonces from ``GET /auth/nonce`` that every server process sees.

A nonce issued by one process of a ``--processes`` server, or by one server behind a load
balancer, must authenticate a WebSocket that lands on any other (the processes share one port,
so no affinity at a balancer can help), at its upgrade (``?pubkey&sig&nonce``) or by the
``authenticate`` method. So a server with Redis keeps these nonces there, one key each::

    {prefix}nonce:{value}   string "{pubkey}|{owner}" (pubkey: the key it was issued for, empty
                            for any; owner: the asking address), set with SET NX PX, expiring
                            when the client was told it would (``expires_at``)

Redeeming is one atomic ``GETDEL`` (Redis 6.2 or later): the first process to ask takes the
nonce and no other can, so a nonce is single use across every process and every server. The
signature is then checked by the same code as for any nonce (:func:`circles.server.access.nonces.proved_by`).

Only the server chooses nonce values (128 random bits), and a value that does not have their
form is refused without asking Redis, so a client cannot make keys of its choosing. What a
client can make is bounded by this process's caps, kept in memory (a
:class:`~circles.server.access.nonces.NonceStore` as the ledger of the nonces this process issued): in all
(``--max-http-nonces``' 10,000, per process) and per client address (``--max-http-nonces-per-ip``,
per process). A ledger entry is freed when the nonce is redeemed in this process or expires; one
redeemed by another process stays counted here until it would have expired. Expiry in Redis is
Redis's own (its clock); the ledger's, and the ``expires_at`` clients are told, the injected
reactor's.

Redis unreachable, not answering within :data:`TIMEOUT` seconds, or full (at its maxmemory):
:meth:`~RedisNonceStore.issue` and :meth:`~RedisNonceStore.redeem_value` fail with
:class:`~circles.backend.scripts.BackendUnavailable` (its ``BackendFull`` when full), which
``/auth/nonce`` answers 503, the WebSocket upgrade 503 and ``authenticate`` -32004. Redeeming
needs no memory, so it works while Redis is full.

A server without Redis (embedded with a script backend of its own) keeps them in memory:
:class:`~circles.server.access.nonces.NonceStore`, the same interface.
"""

from __future__ import annotations

import math

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from txredisapi import ResponseError
from zope.interface import implementer

from circles.backend.commands import TIMEOUT, CommandConnection
from circles.backend.redis_url import RedisAddress
from circles.backend.scripts import BackendUnavailable
from circles.backend.values import text
from circles.common.signatures import AuthenticationFailed
from circles.server.access.nonces import INonceStore, Nonce, NonceStore, TooManyNonces, is_nonce_value, proved_by

#: Said in the log when Redis does not know GETDEL.
_NEEDS = " (taking a nonce needs GETDEL: Redis 6.2 or later)"


def nonce_key(prefix: str, value: str) -> str:
    return f"{prefix}nonce:{value}"


@implementer(INonceStore)
class RedisNonceStore(CommandConnection):
    """Nonces in Redis, on a connection of its own (:class:`~circles.backend.commands.CommandConnection`).

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
                 timeout: float = TIMEOUT, clock: IReactorTime | None = None) -> None:
        super().__init__(address, reactor=reactor, timeout=timeout, doing="issue or take a nonce")
        self.clock: IReactorTime = reactor if clock is None else clock
        self.prefix = prefix
        self.ledger = NonceStore(self.clock, ttl, cap, per_owner)  # what this process issued, still live

    def live(self) -> int:
        return len(self.ledger)

    def issue(self, pubkey: str | None = None, owner: str | None = None) -> Deferred:
        try:
            nonce = self.ledger.issue_now(pubkey, owner)
        except TooManyNonces:
            return fail()
        milliseconds = max(1, math.ceil((nonce.expires_at - self.clock.seconds()) * 1000))
        return self._command(lambda reply: self._stored(reply, nonce), "SET", nonce_key(self.prefix, nonce.value),
                             f"{pubkey or ''}|{owner or ''}", "NX", "PX", milliseconds)

    def _stored(self, reply, nonce: Nonce) -> Nonce | Failure:
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

    def redeem_value(self, value: str, pubkey: str | None, signature: str) -> Deferred:
        if not is_nonce_value(value):  # never issued: no need to ask, nor to send its bytes to Redis
            return fail(AuthenticationFailed("nonce unknown, used or expired"))
        d = self._command(lambda stored: self._taken(stored, value), "GETDEL", nonce_key(self.prefix, value))
        d.addCallback(lambda bound: proved_by(value, bound, pubkey, signature))
        return d

    def _taken(self, stored, value: str) -> str | None | Failure:
        """Redis's reply to the GETDEL: the key the nonce was issued for (None: any), or why not."""
        if isinstance(stored, Failure):
            return stored
        if stored is None:
            raise AuthenticationFailed("nonce unknown, used or expired")
        self.ledger.take(value)  # frees this process's count of it, if it issued it
        return text(stored).partition("|")[0] or None

    def _command(self, settle, *args) -> Deferred:
        return self.command(lambda redis: redis.execute_command(*args), settle, hint=_NEEDS)
