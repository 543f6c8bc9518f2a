"""A replicated Redis named through its Sentinels (``redis+sentinel://``): where the primary is
now (:class:`Sentinels`), and a pool that connects there and uses a connection only once the
node it reaches says it is the primary (:class:`PrimaryFactory`, :class:`PrimaryEndpoint`).
:func:`circles.backend.redis.connect` puts them together."""

from __future__ import annotations

import txredisapi
from twisted.internet.defer import CancelledError, Deferred, DeferredList, FailureGroup, ensureDeferred, race
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater
from zope.interface import implementer

from circles.backend.redis_url import CONNECT_TIMEOUT
from circles.backend.txredisapi_patches import CheckedProtocol, Subscriber, drop_connections
from circles.backend.values import text

#: Seconds a Sentinel may take to answer where the primary is.
SENTINEL_TIMEOUT = 1.0


class NoPrimary(txredisapi.ConnectionError):
    """No Sentinel could name a primary that is up (during a failover, or none reachable)."""


class Sentinels:
    """Connections to the Sentinels of a ``redis+sentinel://`` address, kept up, to ask them
    where the primary is. Only connected Sentinels are asked, so a dead one costs nothing."""

    def __init__(self, master: str, connections: list, reactor) -> None:
        """``connections``: a txredisapi pool to each Sentinel
        (:func:`circles.backend.redis.connect`, with a ``reply_timeout`` of :data:`SENTINEL_TIMEOUT`)."""
        self.master = master
        self.clock = reactor
        self.connections = connections

    async def primary(self) -> tuple[str, int]:
        """``(host, port)`` of the primary, as the first Sentinel to answer names it, provided
        it believes that primary up (not ``s_down``/``o_down``): the client side of Redis's
        Sentinel client guidelines, with the role checked once connected."""
        waited = 0.0
        while not any(c.size for c in self.connections):
            if waited >= CONNECT_TIMEOUT:
                raise NoPrimary(f"no Sentinel of {self.master} answers")
            await deferLater(self.clock, 0.05, lambda: None)  # just started: give them a moment
            waited += 0.05
        named = [ensureDeferred(self._named(c.handler.execute_command("SENTINEL", "MASTER", self.master)))
                 for c in self.connections if c.size]
        try:
            _, primary = await race(named)
        except FailureGroup as e:
            if any(f.check(CancelledError) for f in e.failures):
                raise CancelledError() from None  # this call was cancelled: race cancelled every answer
            raise NoPrimary(f"no Sentinel knows a primary of {self.master} that is up") from None
        return primary

    @staticmethod
    async def _named(command: Deferred) -> tuple[str, int]:
        """The primary a Sentinel's answer (``SENTINEL MASTER``) names, if it believes it up; else
        :class:`NoPrimary`. Cancelled once another Sentinel answered first; the command itself never
        is (txredisapi matches replies to commands in order)."""
        reply = await _reply_or_none(command)
        state = dict(zip(reply[0::2], reply[1::2])) if isinstance(reply, list) else {}
        flags = set(text(state.get("flags")).split(","))
        if "master" in flags and not flags & {"s_down", "o_down", "disconnected"}:
            return text(state["ip"]), int(text(state["port"]))
        raise NoPrimary("this Sentinel names no primary that is up")

    def disconnect(self) -> Deferred:
        return DeferredList([c.disconnect() for c in self.connections], consumeErrors=True)


class PrimaryProtocol(CheckedProtocol):
    """A connection that asks ``ROLE`` before it is used, and is closed unless the node says it
    is the primary: nothing is ever sent to a replica (a connection lost meanwhile never joins
    the pool either: :class:`~circles.backend.txredisapi_patches.CheckedProtocol`).
    (txredisapi's SentinelRedisProtocol makes it ready whatever happened, and leaves a refused
    password as an unhandled error.)"""

    async def usable(self) -> bool:
        role = await self.role()
        return bool(role) and text(role[0]) == "master"


class PrimarySubscriber(PrimaryProtocol, Subscriber):
    """A :class:`~circles.backend.txredisapi_patches.Subscriber` that is used only once its node
    says it is the primary (:class:`PrimaryProtocol`): notifications come from the primary."""


class PrimaryFactory(txredisapi.RedisFactory):
    """A pool whose every new connection checks ``ROLE`` before it is used (:class:`PrimaryProtocol`)."""

    protocol = PrimaryProtocol

    def __init__(self, sentinels: Sentinels, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sentinels = sentinels
        self.primary: tuple[str, int] | None = None  # where the last attempt went

    def retryDelay(self, attempt: int) -> float:
        # The first retry at once: the primary is asked anew, and a new one is the likely
        # reason the connection was lost.
        return 0.0 if attempt <= 1 else super().retryDelay(attempt)

    def disconnect(self) -> Deferred:
        d = super().disconnect()
        return DeferredList([d, self.sentinels.disconnect()], consumeErrors=True)


@implementer(IStreamClientEndpoint)
class PrimaryEndpoint:
    """Connects to wherever the Sentinels say the primary is now."""

    def __init__(self, factory: PrimaryFactory, reactor) -> None:
        self._factory = factory
        self._reactor = reactor

    def connect(self, protocol_factory) -> Deferred:
        return ensureDeferred(self._connect(protocol_factory))

    async def _connect(self, protocol_factory):
        primary = await self._factory.sentinels.primary()
        if self._factory.primary not in (None, primary):
            # A failover: what is still connected reaches the old primary.
            drop_connections(self._factory)
        self._factory.primary = primary
        return await HostnameEndpoint(self._reactor, *primary, timeout=CONNECT_TIMEOUT).connect(protocol_factory)


def _reply_or_none(command: Deferred) -> Deferred:
    """``command``'s reply, or None if it failed, through a Deferred of its own: cancelling that
    one leaves the command be (its reply, when it comes, is dropped)."""
    reply: Deferred = Deferred()
    command.addCallbacks(reply.callback, lambda _: reply.callback(None))
    return reply
