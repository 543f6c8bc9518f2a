"""One port, two ways in: WebSocket upgrades go straight to Autobahn, other HTTP to the Site.

Routing an upgrade through ``twisted.web`` costs a full HTTP parse, a resource lookup and a
re-serialisation of the request for Autobahn to parse again; at thousands of connections a
second that was a sixth of a handshake's CPU. So each connection's first bytes are read here,
up to the end of the request head: a ``GET`` for a circle path with ``Upgrade: websocket`` is
handed to the WebSocket factory, anything else (webhooks, ``/auth``, ``/metrics``, a plain
GET of a circle) to the Site, which answers it as before. Either way the chosen protocol gets
the transport and every byte read so far, and this object only forwards from then on.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Protocol, ServerFactory
from zope.interface import implementer

from .keys import COMPRESSED_HEX_LEN

#: A request head larger than this is not an upgrade we serve: the Site answers it (431/400).
MAX_HEAD = 16 * 1024


def is_circle_upgrade(head: bytes) -> bool:
    """Whether an HTTP request head is a WebSocket upgrade of a path that may name a circle."""
    request_line, _, headers = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return False
    path = parts[1].split(b"?", 1)[0]
    if len(path) != COMPRESSED_HEX_LEN + 1 or not path.startswith(b"/"):
        return False
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False


class _FirstBytes(Protocol):
    def __init__(self, router: "UpgradeRouter", addr) -> None:
        self._router = router
        self._addr = addr
        self._head = b""
        self._inner: Optional[Protocol] = None
        self._timer = None

    def connectionMade(self) -> None:
        self._timer = self._router.reactor.callLater(self._router.timeout, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) <= MAX_HEAD:
            return
        self._timer.cancel()
        factory = self._router.websocket if end >= 0 and is_circle_upgrade(self._head[:end]) else self._router.site
        inner = factory.buildProtocol(self._addr)
        if inner is None:
            self.transport.loseConnection()
            return
        self._inner = inner
        buffered, self._head = self._head, b""
        inner.makeConnection(self.transport)
        inner.dataReceived(buffered)

    def connectionLost(self, reason) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif self._timer is not None and self._timer.active():
            self._timer.cancel()


@implementer(IProtocolNegotiationFactory)
class UpgradeRouter(ServerFactory):
    """The factory the ports listen with: routes each connection to ``websocket`` or ``site``.

    A connection must send its whole request head within ``timeout`` seconds; after that the
    chosen protocol's own deadlines apply (Autobahn's opening handshake timeout, the Site's).
    Over TLS it offers ``http/1.1`` in ALPN, whatever TLS options an embedding application
    brings (:mod:`circles.tls` explains why that matters).
    """

    def __init__(self, websocket: ServerFactory, site: ServerFactory, reactor, timeout: float) -> None:
        self.websocket = websocket
        self.site = site
        self.reactor = reactor
        self.timeout = timeout

    def buildProtocol(self, addr) -> Protocol:
        return _FirstBytes(self, addr)

    def acceptableProtocols(self) -> list:
        return [b"http/1.1"]  # both ways in are HTTP/1.1

    def startFactory(self) -> None:
        self.site.doStart()
        self.websocket.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()
        self.websocket.doStop()
