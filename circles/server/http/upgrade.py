"""One port, two ways in: WebSocket upgrades go straight to Autobahn, other HTTP to the Site.

Routing an upgrade through ``twisted.web`` costs a full HTTP parse, a resource lookup and a
re-serialisation of the request for Autobahn to parse again; at thousands of connections a
second that was a sixth of a handshake's CPU. So each connection's first bytes are read here,
up to the end of the request head: a ``GET`` for a circle path with ``Upgrade: websocket`` is
handed to the WebSocket factory, anything else (webhooks, ``/auth``, ``/metrics``, a plain
GET of a circle) to the Site, which answers it as before. Either way the chosen protocol gets
the transport and every byte read so far, and this object only forwards from then on.

Until then a connection is *pending*, and counted by peer address (an IPv6 one by its /64):
one address may hold at most ``max_pending_per_peer`` of them (503 past it), so a crowd of
silent connections from one client cannot take the descriptors everyone else needs. A head
that cannot be parsed because it is too large is answered here: 414 for a request line over
16 KiB, 431 for a longer head. A head with a line ending in a bare LF (no CR before it) goes to
the Site as soon as that LF arrives, whatever else it says: Autobahn, like the Site, splits the
head on CRLF only, so such a head would otherwise wait for an end that never comes; the Site's
channel (:class:`~circles.server.http.request_limits.RequestDeadlineChannel`) answers it 400.

On a TLS port, a client that speaks plain HTTP (``ws://`` or ``http://`` to a ``wss://`` port)
fails the TLS handshake with its first bytes, ``GET ``: OpenSSL reports that as "http request",
and the connection closes with nothing routed. That is said in the log in those words (through
the gateway's budget of refused-request lines: anyone can send it), since a bare handshake
failure does not name the likely cause; the client, which gets no answer at all, says it too
(:mod:`circles.client.diagnostics`).
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error as TLSError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IProtocolNegotiationFactory, ITCPTransport
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from circles.common.keys import PATH_KEY_LENGTHS
from circles.common.log_budget import LogBudget
from circles.common.logs import Logger, worth_logging
from circles.server.access.limits import address_key, half_close
from circles.server.http.responses import refusal

log = Logger()

#: A request head larger than this is answered here, 431 (Twisted's Site would not parse it either).
MAX_HEAD = 16 * 1024
#: The longest request line the Site parses (Twisted's ``HTTPChannel.MAX_LENGTH``).
MAX_LINE = 16 * 1024


URI_TOO_LONG = refusal(b"414 URI Too Long", b"request line over 16 KiB")
HEAD_TOO_LARGE = refusal(b"431 Request Header Fields Too Large", b"request head over 16 KiB")
TOO_MANY_PENDING = refusal(b"503 Service Unavailable", b"too many unfinished requests from this address")


#: OpenSSL's reasons for a TLS handshake that began with a plain HTTP request instead.
PLAIN_HTTP_REASONS = ("http request", "https proxy request")


def plain_http_on_tls(reason) -> bool:
    """Whether a connection was lost because its client spoke plain HTTP to a TLS port."""
    if reason is None or not reason.check(TLSError):
        return False
    errors = reason.value.args[0] if reason.value.args else []
    return any(isinstance(e, tuple) and len(e) == 3 and e[2] in PLAIN_HTTP_REASONS for e in errors)


def oversized(head: bytes, end: int) -> bytes | None:
    """The answer to a request head too large to parse (``end``: where it ends, -1 if it does
    not yet), or None if it is not."""
    line_end = head.find(b"\r\n", 0, MAX_LINE + 2)
    if line_end < 0 or line_end > MAX_LINE:
        return URI_TOO_LONG
    if end < 0 or end > MAX_HEAD:
        return HEAD_TOO_LARGE
    return None


def has_bare_lf(head: bytes) -> bool:
    """Whether a line of an HTTP request head ends in a bare LF, not CRLF."""
    return head.count(b"\n") != head.count(b"\r\n")


def is_circle_upgrade(head: bytes) -> bool:
    """Whether an HTTP request head is a WebSocket upgrade of a path that may name a circle."""
    request_line, _, headers = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    path = parts[1].split(b"?", 1)[0]
    if len(path) - 1 not in PATH_KEY_LENGTHS or not path.startswith(b"/"):
        return False
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


#: Seconds a refused connection may take to read its answer before it is aborted. Over TLS the
#: answer waits for the handshake, which a client may start and never finish.
REFUSAL_GRACE = 2.0


class _Refusal(Protocol):
    """Answers a fixed refusal and closes; reads nothing; aborts after :data:`REFUSAL_GRACE`."""
    transport: ITCPTransport  # set before any callback (TCP, TLS or unix: each can abort)

    _timer = None

    def __init__(self, answer: bytes, reactor) -> None:
        self._answer = answer
        self._reactor = reactor

    def connectionMade(self) -> None:
        self._timer = self._reactor.callLater(REFUSAL_GRACE, self.transport.abortConnection)
        self.transport.write(self._answer)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


class _Discard(Protocol):
    """What a refused connection still sends goes here, unread, until it closes."""


class _FirstBytes(Protocol):
    """Reads a connection's request head, then hands the connection on and forwards to what
    took it; it lives as long as the connection, so it keeps nothing else from then on."""

    transport: ITCPTransport  # set before any callback (TCP, TLS or unix: each can abort)

    __slots__ = ("_router", "_addr", "_peer", "_head", "_inner", "_timer")

    def __init__(self, router: UpgradeRouter, addr, peer: str | None) -> None:
        self._router = router
        self._addr = addr  # until routed
        self._peer = peer  # counted as pending under this address until routed or closed
        self._head = b""
        self._inner: IProtocol | None = None
        self._timer: Any = None  # the head's deadline, from connectionMade until routed

    def connectionMade(self) -> None:
        self._timer = self._router.reactor.callLater(self._router.timeout, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        # Checked as each LF arrives (the byte before it has too): no bare LF goes unseen.
        malformed = b"\n" in data and has_bare_lf(self._head if end < 0 else self._head[:end])
        if not malformed:
            if end < 0 and len(self._head) <= MAX_HEAD:
                return
            answer = oversized(self._head, end)
            if answer is not None:
                self._refuse(answer)
                return
        self._timer.cancel()
        self._timer = None
        self._router.routed(self._peer)
        self._peer = None
        upgrade = not malformed and end >= 0 and is_circle_upgrade(self._head[:end])
        factory = self._router.websocket if upgrade else self._router.site
        inner = factory.buildProtocol(self._addr)
        if inner is None:
            self.transport.loseConnection()
            return
        self._inner, self._addr = inner, None
        buffered, self._head = self._head, b""
        inner.makeConnection(self.transport)
        inner.dataReceived(buffered)

    def _refuse(self, answer: bytes) -> None:
        """Answer and stop reading; the deadline still drops a client that does not close."""
        self._inner, self._head = _Discard(), b""
        self.transport.write(answer)
        if not half_close(self.transport):
            self.transport.loseConnection()  # over TLS: the answer, then close_notify

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._peer is not None:
            self._router.routed(self._peer)
            self._peer = None
        if self._inner is None and self._router.refusals is not None and plain_http_on_tls(reason):
            self._router.refusals.note(getattr(self._addr, "host", str(self._addr)), "plain HTTP on TLS",
                                       "a plain HTTP request (ws:// or http://) from {peer} on this TLS port: "
                                       "the client must use wss:// (https://)")
        if self._inner is not None:
            self._inner.connectionLost(reason)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


@implementer(IProtocolNegotiationFactory)
class UpgradeRouter(ServerFactory):
    """The factory the ports listen with: routes each connection to ``websocket`` or ``site``.

    A connection must send its whole request head within ``timeout`` seconds; after that the
    chosen protocol's own deadlines apply (Autobahn's opening handshake timeout, the Site's).
    Over TLS it offers ``http/1.1`` in ALPN, whatever TLS options an embedding application
    brings (:mod:`circles.server.tls` explains why that matters).
    """

    noisy = False  # no "Starting factory <...>" lines (circles.common.logs: what info shows)
    name = "circles"  # a port says "circles starting on 8443" (Twisted's line names the factory so)

    def __init__(self, websocket: IProtocolFactory, site: IProtocolFactory, reactor, timeout: float,
                 max_pending_per_peer: int = 0, refusals: LogBudget | None = None) -> None:
        self.websocket = websocket
        self.refusals = refusals  # where connections refused before routing are logged (None: not logged)
        self.site = site
        self.reactor = reactor
        self.timeout = timeout
        self.max_pending_per_peer = max_pending_per_peer  # 0: no limit
        self.pending: dict[str, int] = {}  # connections still sending their head, by address
        self.refused = 0
        self._counts = self  # the router whose pending and refused counts this one keeps

    def serving(self, site: IProtocolFactory) -> UpgradeRouter:
        """A router for another port (``--metrics-listen``) that hands every request to ``site``,
        under this one's deadline and counting its pending connections with this one's: a
        second port is no second allowance per address."""
        router = UpgradeRouter(site, site, self.reactor, self.timeout, self.max_pending_per_peer, self.refusals)
        router._counts = self
        router.name = "circles metrics"
        return router

    def logPrefix(self) -> str:
        return self.name

    def buildProtocol(self, addr) -> Protocol:
        peer = address_key(getattr(addr, "host", None))
        if peer is not None:
            counts = self._counts
            n = counts.pending.get(peer, 0)
            if self.max_pending_per_peer and n >= self.max_pending_per_peer:
                counts.refused += 1
                if worth_logging(counts.refused):
                    log.warn("refused a connection from {peer}: {n} of its connections have not sent their "
                             "request yet (--max-pending-per-ip); {refused} refused so far",
                             peer=peer, n=n, refused=counts.refused)
                return _Refusal(TOO_MANY_PENDING, self.reactor)
            counts.pending[peer] = n + 1
        return _FirstBytes(self, addr, peer)

    def routed(self, peer: str | None) -> None:
        """A connection from ``peer`` is pending no more (routed, or closed)."""
        if peer is None:
            return
        pending = self._counts.pending
        left = pending[peer] - 1
        if left:
            pending[peer] = left
        else:
            del pending[peer]

    def acceptableProtocols(self) -> list:
        return [b"http/1.1"]  # both ways in are HTTP/1.1

    def startFactory(self) -> None:
        self.site.doStart()
        if self.websocket is not self.site:
            self.websocket.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()
        if self.websocket is not self.site:
            self.websocket.doStop()
