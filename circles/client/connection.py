"""A Python client for a circles server, on Autobahn's Twisted WebSocket client.

    from twisted.internet.task import react
    from circles.client import connect

    async def main(reactor):
        client = await connect("wss://localhost:8443/02…", reactor=reactor, ca="state/certs/ca.pem")
        await client.authenticate(open_key)          # fetch_nonce, sign, authenticate
        print(await client.play("40 + 2"))
        await client.close()

    react(lambda reactor: ensureDeferred(main(reactor)))

Every call returns a Deferred. Requests carry their own ids, so many calls may be in flight on
one connection; replies are matched by id. A JSON-RPC error fails the call with
:class:`RPCError` (``code``, ``message``, ``data``); a connection that closes fails every
pending call with :class:`ConnectionClosed`, naming the method that got no reply. Nothing is
retried behind the caller's back: a ``play`` whose reply was lost may or may not have run.
A server that stops answering with the connection still open (stopped, wedged, a network that
drops packets) is found by WebSocket pings every :data:`PING_INTERVAL` seconds: one unanswered
for ``timeout`` seconds drops the connection, which fails the pending calls the same way.

The URL is checked before connecting (:func:`check_url`: ``ws://`` or ``wss://`` and a path
ending in the circle's id). ``wss://`` verifies the server's certificate and host name
(service-identity) against the system's trust store, or against ``ca`` (a PEM file) when given;
``insecure=True`` turns verification off and is for development only. A certificate that does
not verify fails with :class:`CertificateNotVerified`, saying why; a refused upgrade with
:class:`ConnectFailed` carrying its HTTP ``status`` (404: the server does not serve the circle)
(:mod:`circles.client.diagnostics` says why a connection did not open).
:class:`~circles.client.reconnecting.ReconnectingClient` keeps a connection up.
"""

from __future__ import annotations

import itertools
import json
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from OpenSSL import SSL
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from circles.client.diagnostics import CertificateNotVerified, ConnectFailed, not_opened  # noqa: F401 (re-exported)
from circles.client.signing import PrivateKeyLike, private_key, public_key, sign_nonce
from circles.common.jsonrpc import RPCError  # also circles.client.RPCError: the one JSON-RPC error class
from circles.common.keys import COMPRESSED_HEX_LEN, InvalidKey, normalize_pubkey
from circles.common.once import Once
from circles.common.tls_client import client_options
from circles.common.wire import GATEWAY, SUBPROTOCOLS

# Twisted's own Logger, deliberately: the client runs in an application's process, whose observers
# decide what is kept (--log-level belongs to the server's and the worker's twistd plugins).
log = Logger()

DEFAULT_TIMEOUT = 30.0  # seconds to connect and finish the opening handshake, or to answer a ping
PING_INTERVAL = 10.0  # seconds between the pings that find a server no longer answering


def check_url(url: str) -> str:
    """The circle ``url`` names, checked before connecting: ``ws://`` or ``wss://``, a host, and
    a path ending in the circle's id (its compressed public key). ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        secure = "wss" if parts.scheme in ("https", "wss") else "ws"
        raise ValueError(f"{url} is not a WebSocket URL: give {secure}://host:port/{{circle_pk}}")
    if not parts.hostname:
        raise ValueError(f"{url} names no host: give {parts.scheme}://host:port/{{circle_pk}}")
    circle = parts.path.rsplit("/", 1)[-1]
    if not circle:
        raise ValueError(f"{url} names no circle: the URL needs /{{circle_pk}}, the circle's public key "
                         f"({COMPRESSED_HEX_LEN} hex digits), e.g. {parts.scheme}://{parts.netloc}/02…")
    try:
        compressed = normalize_pubkey(circle)
    except InvalidKey as e:
        raise ValueError(f"{url}: {circle[:80]!r} is not a circle id ({e}); the URL needs /{{circle_pk}}, "
                         f"the circle's public key ({COMPRESSED_HEX_LEN} hex digits)") from None
    if circle != compressed:
        raise ValueError(f"{url}: a circle is named by its compressed public key, lower-case: /{compressed}")
    return circle


#: The close code of a server shutting down (or restarting): it sent it only once every call it
#: took was answered.
GOING_AWAY = 1001


class ConnectionClosed(ConnectionError):
    """The connection closed before a call's reply arrived, or a call was made after that.

    ``sent``: whether the request went out at all (False: the connection was closing already, so
    the server never saw it); ``code``: the WebSocket close code, when one was received."""

    def __init__(self, message: str, *, sent: bool = True, code: int | None = None) -> None:
        super().__init__(message)
        self.sent = sent
        self.code = code


# -- TLS ---------------------------------------------------------------------------------------

def tls_options(host: str, ca: str | None = None, insecure: bool = False) -> IOpenSSLClientConnectionCreator:
    """Client TLS for ``host``: verified against the system trust store, or ``ca`` (PEM file)."""
    if insecure:
        # Development only: any certificate, any host name.
        return CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_2)
    return client_options(host, ca)


def endpoint_for(url: str, reactor: Any, *, ca: str | None = None, insecure: bool = False,
                 timeout: float = DEFAULT_TIMEOUT) -> IStreamClientEndpoint:
    """The Twisted client endpoint reaching ``url`` (TLS-wrapped for ``wss://``)."""
    is_secure, host, port, _, _, _ = parse_url(url)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if is_secure:
        endpoint = wrapClientTLS(_Recorded(tls_options(host, ca, insecure), ca), endpoint)
    elif ca is not None or insecure:
        raise ValueError("a CA or insecure option only applies to wss:// URLs")
    return endpoint


@implementer(IOpenSSLClientConnectionCreator)
class _Recorded:
    """TLS options that hand each connection's OpenSSL object to its WebSocket protocol, which
    reads the server's certificates from it should they not verify (to say why)."""

    def __init__(self, options: IOpenSSLClientConnectionCreator, ca: str | None) -> None:
        self._options = options
        self._ca = ca

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tls_protocol)
        protocol = getattr(tls_protocol, "wrappedProtocol", None)
        if isinstance(protocol, ClientProtocol):
            protocol.tls = (connection, self._ca)
        return connection


# -- the WebSocket protocol --------------------------------------------------------------------

class ClientProtocol(WebSocketClientProtocol):
    """One connection: sends requests, matches replies to them by id."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred = Deferred()
        self.closed = Once()  # (code, reason)
        self._pending: dict[int, tuple[Deferred, str]] = {}
        self._ids = itertools.count(1)
        self._lost: Failure | None = None
        self.tls: tuple | None = None  # (OpenSSL connection, CA file) over wss://
        self.url: str | None = None

    def connectionMade(self) -> None:
        # The URL this connection was made for: a ReconnectingClient's factory moves on to the next.
        self.url = self.factory.url
        super().connectionMade()

    def onOpen(self) -> None:
        self.tls = None  # verified: nothing to explain
        self.opened.callback(self)

    def request(self, method: str, params: Any = None) -> Deferred:
        if self.state != self.STATE_OPEN:
            return fail(ConnectionClosed(f"not connected to {self.url}: cannot call {method}", sent=False))
        request_id = next(self._ids)
        message: dict = {"jsonrpc": "2.0", "method": method, "id": request_id}
        if params is not None:
            message["params"] = params
        def forget(_: Deferred) -> None:  # cancelled: no reply is awaited
            self._pending.pop(request_id, None)

        d: Deferred = Deferred(forget)
        self._pending[request_id] = (d, method)
        self.sendMessage(json.dumps(message).encode("utf-8"))
        return d

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warn("ignored a message that is not JSON from {url}", url=self.url)
            return
        for reply in message if isinstance(message, list) else [message]:
            request_id = reply.get("id") if isinstance(reply, dict) else None
            entry = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
            if entry is None:
                # id null: the server could not read a request (-32700/-32600); ours are well formed.
                log.warn("reply matching no pending call from {url}: {reply!r}", url=self.url, reply=reply)
                continue
            d, _ = entry
            if "error" in reply:
                d.errback(RPCError.from_json(reply["error"]))
            else:
                d.callback(reply.get("result"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = reason  # the TLS or socket error behind an unclean close
        super().connectionLost(reason)

    def _why(self, code: int | None, reason: str | None) -> str:
        why = f"code {code}" + (f": {reason}" if reason else "")
        if self._lost is not None and not self.opened.called:
            why += f" ({self._lost.getErrorMessage()})"
        return why

    def _not_opened(self, why: str) -> ConnectFailed:
        assert self.url is not None  # set as the connection was made
        return not_opened(self.url, getattr(self, "http_status_line", None) or "", self._lost, self.tls, why)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        url = self.url
        why = self._why(code, reason)
        if not self.opened.called:
            self.opened.errback(self._not_opened(why))
        pending, self._pending = self._pending, {}
        for d, method in pending.values():
            d.errback(ConnectionClosed(f"connection to {url} closed ({why}) before the reply to {method} arrived",
                                       code=code))
        if not self.closed.fired:
            self.closed.fire((code, reason))


def websocket_factory(url: str, reactor: Any, timeout: float) -> WebSocketClientFactory:
    # Our contract ({output}, -32005...) on every server, one defaulting to the circles-era one too.
    factory = WebSocketClientFactory(url, reactor=reactor, protocols=[SUBPROTOCOLS[GATEWAY]])
    factory.protocol = ClientProtocol
    factory.setProtocolOptions(openHandshakeTimeout=timeout, closeHandshakeTimeout=5,
                               autoPingInterval=PING_INTERVAL, autoPingTimeout=timeout)
    return factory


# -- the client --------------------------------------------------------------------------------

class CircleClient:
    """The JSON-RPC methods of one open connection to a circle."""

    def __init__(self, protocol: ClientProtocol) -> None:
        self._protocol = protocol
        assert protocol.url is not None  # an open connection's
        self.url: str = protocol.url
        self.pubkey: str | None = None  # the key this connection authenticated as

    def call(self, method: str, params: Any = None) -> Deferred:
        """Any JSON-RPC method; fires with its ``result`` or fails with :class:`RPCError`."""
        return self._protocol.request(method, params)

    def fetch_nonce(self, pubkey: str | None = None) -> Deferred:
        """``{nonce, expires_at}``; the nonce is bound to ``pubkey`` when given."""
        return self.call("fetch_nonce", None if pubkey is None else {"pubkey": pubkey})

    def authenticate(self, key: PrivateKeyLike, scheme: str = "eth") -> Deferred:
        """Fetch a fresh nonce, sign it with ``key`` (``eth`` or ``ecdsa``), authenticate.

        Fires with ``{authenticated: true, pubkey}``. The key never leaves this process.
        """
        return ensureDeferred(self._authenticate(private_key(key), scheme))

    async def _authenticate(self, key: PrivateKeyLike, scheme: str) -> dict:
        pubkey = public_key(key)
        nonce = (await self.fetch_nonce(pubkey))["nonce"]
        result = await self.call("authenticate", {"pubkey": pubkey, "signature": sign_nonce(key, nonce, scheme)})
        self.pubkey = result.get("pubkey", pubkey)
        return result

    def whoami(self) -> Deferred:
        """``{circle, authenticated, pubkey}``."""
        return self.call("whoami")

    def play(self, script: str, timeout: float | None = None) -> Deferred:
        """Run ``script`` on the circle's workers; fires with its output (a string)."""
        params: dict = {"script": script}
        if timeout is not None:
            params["timeout"] = timeout
        return self.call("play", params).addCallback(lambda result: result["output"])

    def discover(self) -> Deferred:
        """The server's OpenRPC document."""
        return self.call("rpc.discover")

    @property
    def connected(self) -> bool:
        return self._protocol.state == self._protocol.STATE_OPEN

    def when_closed(self) -> Deferred:
        """Fires with ``(code, reason)`` once the connection has closed, whoever closed it."""
        return self._protocol.closed.when()

    def close(self) -> Deferred:
        """Close the connection (1000); fires once closed. Pending calls fail."""
        if self._protocol.closed.fired:
            return succeed(None)
        d = self.when_closed()
        self._protocol.sendClose(1000)
        return d


def connect(url: str, *, reactor: Any, ca: str | None = None, insecure: bool = False,
            timeout: float = DEFAULT_TIMEOUT) -> Deferred:
    """Open ``url`` (``ws://`` or ``wss://host:port/<circle>``); fires with a :class:`CircleClient`.

    Fails with :class:`ConnectFailed` when the server cannot be reached, the TLS handshake
    fails (e.g. the certificate is not trusted) or the server refuses the circle (404).
    """
    try:
        check_url(url)
        endpoint = endpoint_for(url, reactor, ca=ca, insecure=insecure, timeout=timeout)
        factory = websocket_factory(url, reactor, timeout)
    except (ValueError, OSError) as e:
        return fail(ConnectFailed(f"cannot open {url}: {e}"))
    return ensureDeferred(_connected(url, endpoint, factory))


async def _connected(url: str, endpoint: IStreamClientEndpoint, factory: WebSocketClientFactory) -> CircleClient:
    """A :class:`CircleClient` once ``endpoint`` is connected and the WebSocket open; any other
    failure (cancelled included) as :class:`ConnectFailed`."""
    try:
        protocol: ClientProtocol = await endpoint.connect(factory)  # type: ignore[assignment]  # the factory's
        return CircleClient(await protocol.opened)
    except ConnectFailed:
        raise
    except Exception:
        raise ConnectFailed(f"cannot open {url}: {Failure().getErrorMessage()}") from None
