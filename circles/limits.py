"""Limits that keep one client, or a crowd of them, from taking the server down.

:class:`ConnectionLimit` wraps the Site's factory and refuses a TCP connection at accept time
when the server, or the peer's address, already holds its share. It is the innermost wrapper
(inside TLS), which is where Autobahn's ``WebSocketResource`` looks when it takes a
connection over from HTTP, so it keeps counting after the upgrade and releases the slot when
the WebSocket closes. :class:`TokenBucket` bounds each connection's request rate.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.protocols.policies import WrappingFactory

from .logs import Logger

log = Logger()


class ConnectionLimit(WrappingFactory):
    """At most ``total`` connections, and ``per_peer`` from one address (0: no limit)."""

    def __init__(self, wrapped, total: int = 0, per_peer: int = 0) -> None:
        super().__init__(wrapped)
        self.total = total
        self.per_peer = per_peer
        self.by_peer: dict = {}
        self._refusals = 0

    @property
    def open(self) -> int:
        return len(self.protocols)

    def buildProtocol(self, addr):
        host = getattr(addr, "host", None)
        if (self.total and len(self.protocols) >= self.total) or \
                (self.per_peer and self.by_peer.get(host, 0) >= self.per_peer):
            self._refusals += 1
            if self._refusals in (1, 10, 100) or self._refusals % 1000 == 0:
                log.warn("refused a connection from {peer}: {open} open (limits: {total} total, "
                         "{per_peer} per address); {n} refused so far",
                         peer=host, open=len(self.protocols), total=self.total, per_peer=self.per_peer,
                         n=self._refusals)
            return None  # Twisted closes the connection at once
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            protocol.peer_host = host
            self.by_peer[host] = self.by_peer.get(host, 0) + 1
        return protocol

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        host = getattr(protocol, "peer_host", None)
        left = self.by_peer.get(host, 0) - 1
        if left > 0:
            self.by_peer[host] = left
        else:
            self.by_peer.pop(host, None)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; :meth:`take` spends them.

    A rate of 0 admits everything. Time comes from ``clock`` so tests can drive it.
    """

    __slots__ = ("_clock", "_rate", "_burst", "_tokens", "_stamp")

    def __init__(self, clock: IReactorTime, rate: float, burst: Optional[float] = None) -> None:
        self._clock = clock
        self._rate = rate
        self._burst = burst if burst is not None else 2 * rate
        self._tokens = self._burst
        self._stamp = clock.seconds()

    def take(self, n: int = 1) -> bool:
        if not self._rate:
            return True
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < n:
            return False
        self._tokens -= n
        return True
