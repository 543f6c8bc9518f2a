"""Limits that keep one client, or a crowd of them, from taking the server down.

:class:`ConnectionCount` counts open WebSockets, in all and per peer address, from the opening
handshake (where a refusal can be HTTP 503) to the close. :class:`TokenBucket` bounds each
connection's request rate. :class:`OriginPolicy` decides which browser origins may connect
(403 otherwise). :func:`address_key` says whom a per-address limit counts a peer against. The
bounds on HTTP requests (time, body) are :mod:`circles.server.http.request_limits`.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.internet.interfaces import IReactorTime
from twisted.protocols.tls import TLSMemoryBIOProtocol

from circles.common.logs import Logger, worth_logging

log = Logger()


def address_key(host: str | None) -> str | None:
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

    def admit(self, peer: str) -> str | None:
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


#: The port of an origin that names none: its scheme's default (RFC 6454); other schemes have none.
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ANY_PORT = -1
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_PORT = re.compile(r"[0-9]{1,5}")

#: The rule, once: ``--allowed-origins --help``, the README and the docstring below say it so.
ORIGIN_RULE = (
    "a pattern is * (any origin), null (the origin 'null' of sandboxed and file: pages), or "
    "scheme://host[:port] with no path; scheme and host are compared without case and exactly, "
    "a port left out is the scheme's default (80 for http, 443 for https) and :* is any port; "
    "a host *.example.com matches every name under example.com at any depth (a.example.com, "
    "a.b.example.com) but not example.com itself; * is allowed nowhere else")


def _split_origin(text: str, pattern: bool) -> tuple[str, str, int | None]:
    """``scheme://host[:port]`` as (scheme, host, port); raises ValueError saying what is wrong.

    ``port`` is the scheme's default when the text names none (None if it has no default), or
    ``_ANY_PORT`` for a pattern's ``:*``. A host ``*.domain`` is kept so only in a pattern.
    """
    scheme, sep, authority = text.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ValueError("not scheme://host[:port] (a pattern names its scheme: https://app.example)")
    if any(c in authority for c in "/?#@\\"):
        raise ValueError("an origin is scheme://host[:port] alone: no path, query, fragment or user")
    if authority.startswith("["):  # an IPv6 literal
        close = authority.find("]")
        host, rest = authority[:close + 1], authority[close + 1:]
        if close < 0 or not host[1:-1] or any(c not in "0123456789abcdef:." for c in host[1:-1]):
            raise ValueError(f"bad IPv6 address {host!r}")
    else:
        host, colon, port_text = authority.partition(":")
        rest = colon + port_text
    wildcard = pattern and host.startswith("*.")
    if not _HOST.fullmatch(host[2:] if wildcard else host) and not host.startswith("["):
        if "*" in host:
            raise ValueError("* may only be a host's first label (https://*.example.com) or the port (:*)")
        if not host.isascii():
            raise ValueError(f"host {host!r}: write a name as browsers send it, in punycode (xn--...)")
        raise ValueError(f"bad host {host!r}")
    if not rest:
        return scheme, host, _DEFAULT_PORTS.get(scheme)
    port_text = rest[1:]
    if pattern and port_text == "*":
        return scheme, host, _ANY_PORT
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return scheme, host, int(port_text)


def check_origin_pattern(text: str) -> str:
    """``text`` as a valid ``--allowed-origins`` pattern (lower case), or a ValueError saying why not."""
    pattern = text.strip().lower()
    if pattern not in ("*", "null"):
        try:
            _split_origin(pattern, pattern=True)
        except ValueError as e:
            raise ValueError(f"origin pattern {text!r}: {e}") from None
    return pattern


class OriginPolicy:
    """Which browser origins may open a WebSocket, by the patterns of ``--allowed-origins``.

    The rule (:data:`ORIGIN_RULE`): a pattern is ``*``, ``null``, or ``scheme://host[:port]``.
    The scheme must be the origin's; the host must be the origin's, or, written ``*.domain``,
    end in ``.domain`` (any depth below it, never ``domain`` itself); the port must be the
    origin's, a missing one on either side being the scheme's default (``https://app.example``
    and ``https://app.example:443`` are one origin), or ``*`` (any). Case does not count. Wildcards
    anywhere else are refused when the policy is made (a glob's ``*`` also matched dots and
    ports: ``https://app*.example`` let ``https://app.evil.example`` in). An origin that is not
    ``scheme://host[:port]`` (a path, a wildcard, garbage) matches nothing. A request without
    an Origin header does not come from a browser page and is allowed; ``null`` must be allowed
    by name (or ``*``).
    """

    def __init__(self, patterns) -> None:
        patterns = [check_origin_pattern(p) for p in patterns]
        self.any = "*" in patterns
        self.null = "null" in patterns
        self._exact: set = set()
        self._under: list = []  # (scheme, ".domain", port) of the *.domain patterns
        for pattern in patterns:
            if pattern in ("*", "null"):
                continue
            scheme, host, port = _split_origin(pattern, pattern=True)
            if host.startswith("*."):
                self._under.append((scheme, host[1:], port))
            else:
                self._exact.add((scheme, host, port))

    def allows(self, origin: str | None) -> bool:
        if not origin or self.any:
            return True
        origin = origin.strip().lower()
        if origin == "null":
            return self.null
        try:
            scheme, host, port = _split_origin(origin, pattern=False)
        except ValueError:
            return False
        if (scheme, host, port) in self._exact or (scheme, host, _ANY_PORT) in self._exact:
            return True
        return any(scheme == s and host.endswith(domain) and p in (port, _ANY_PORT) for s, domain, p in self._under)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; :meth:`take` spends them.

    A rate of 0 admits everything. Time comes from ``clock`` so tests can drive it.
    """

    __slots__ = ("_clock", "_rate", "_burst", "_tokens", "_stamp")

    def __init__(self, clock: IReactorTime, rate: float, burst: float | None = None) -> None:
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
