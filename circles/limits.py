"""Limits that keep one client, or a crowd of them, from taking the server down.

:class:`ConnectionCount` counts open WebSockets, in all and per peer address, from the opening
handshake (where a refusal can be HTTP 503) to the close. :class:`TokenBucket` bounds each
connection's request rate. :class:`OriginPolicy` decides which browser origins may connect
(403 otherwise). :func:`address_key` says whom a per-address limit counts a peer against. The
bounds on HTTP requests (time, body) are :mod:`circles.http.limits`.
"""

from __future__ import annotations

import ipaddress
from typing import Optional
from urllib.parse import urlsplit

from autobahn.util import wildcards2patterns
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.tls import TLSMemoryBIOProtocol

from circles.logs import Logger, worth_logging

log = Logger()


def address_key(host: Optional[str]) -> Optional[str]:
    """Whom per-address limits count a peer against: an IPv4 address as itself, an IPv6 one as
    its /64 (which one host usually holds whole), and an IPv4 client of a dual-stack port
    (``::ffff:203.0.113.7``) as its IPv4 address: taken as IPv6, every IPv4 client was one "/64"
    (``::/64``) and one of them exhausting a limit exhausted it for all."""
    if host is None or ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def half_close(transport) -> bool:
    """End our side of ``transport`` after what is written, still reading; False if it cannot.

    Only plain TCP can: the client reads the whole answer and an end of file instead of a reset
    caused by unread data. TLS has no half-close, and Twisted's TLS transport lends out the TCP
    one's ``loseWriteConnection`` (it forwards unknown attributes): that ended the stream
    without close_notify, which strict clients report as a truncation.
    """
    if isinstance(transport, TLSMemoryBIOProtocol):
        return False
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is None:
        return False
    lose_write()
    return True


class ConnectionCount:
    """Open WebSocket connections, in all and by peer address, against their limits (0: none).

    Counted from the opening handshake to the close, where Autobahn can refuse with an HTTP
    status. Connections that never finish their HTTP request are bounded by the Site's
    handshake timeout instead.
    """

    def __init__(self, total: int = 0, per_peer: int = 0) -> None:
        self.total = total
        self.per_peer = per_peer
        self.open = 0
        self.by_peer: dict = {}
        self.refused = 0

    def admit(self, peer: str) -> Optional[str]:
        """Count a connection from ``peer``; return None, or why it is refused (not counted)."""
        if self.total and self.open >= self.total:
            reason = "too many connections"
        elif self.per_peer and self.by_peer.get(peer, 0) >= self.per_peer:
            reason = "too many connections from this address"
        else:
            self.open += 1
            self.by_peer[peer] = self.by_peer.get(peer, 0) + 1
            return None
        self.refused += 1
        if worth_logging(self.refused):
            log.warn("refused a connection from {peer}: {reason} ({open} open; limits {total} total, "
                     "{per_peer} per address); {n} refused so far", peer=peer, reason=reason, open=self.open,
                     total=self.total, per_peer=self.per_peer, n=self.refused)
        return reason

    def release(self, peer: str) -> None:
        self.open -= 1
        left = self.by_peer.get(peer, 0) - 1
        if left > 0:
            self.by_peer[peer] = left
        else:
            self.by_peer.pop(peer, None)


class OriginPolicy:
    """Which browser origins may open a WebSocket: ``*`` wildcard patterns, as configured.

    An origin matches as the browser sends it (``https://app.example``) or with its port
    spelled out (``https://app.example:443``), so a pattern may name the port or leave the
    default one out. (Autobahn's own check only tries the second form, which refused the very
    origins configured without a port, and answered 400.) A request without an Origin header
    does not come from a browser page and is allowed; ``null`` must be allowed by name (or ``*``).
    """

    _DEFAULT_PORTS = {"http": 80, "https": 443}

    def __init__(self, patterns) -> None:
        self.any = "*" in patterns
        self._patterns = wildcards2patterns(list(patterns))

    def allows(self, origin: Optional[str]) -> bool:
        if not origin or self.any:
            return True
        origin = origin.strip()
        forms = [origin.lower()]
        if forms[0] != "null":
            try:
                url = urlsplit(origin)
                scheme, host, port = url.scheme.lower(), url.hostname, url.port
            except ValueError:
                return False
            if not host:
                return False
            default = self._DEFAULT_PORTS.get(scheme)
            port = default if port is None else port
            forms = [f"{scheme}://{host}:{port}"]
            if port == default:
                forms.append(f"{scheme}://{host}")
        return any(pattern.match(form) for pattern in self._patterns for form in forms)


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
