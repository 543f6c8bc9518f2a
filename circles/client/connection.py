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
:class:`ConnectFailed` carrying its HTTP ``status`` (404: the server does not serve the circle). :class:`ReconnectingClient` keeps a connection
up, authenticating each new one with a fresh nonce; given several servers' URLs for one circle (a
deployment without a load balancer), it moves on to the next, round robin, when one fails; its
``play(timeout=...)`` bounds the whole call, waiting for a connection included
(:class:`NoServerReachable` when none comes in time).
"""

from __future__ import annotations

import itertools
import json
import re
import ssl
from typing import Any, Callable, Optional, Sequence, Union
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import connectionDone
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from circles.client.signing import PrivateKeyLike, private_key, public_key, sign_nonce
from circles.common.jsonrpc import RPCError  # also circles.client.RPCError: the one JSON-RPC error class
from circles.common.keys import COMPRESSED_HEX_LEN, InvalidKey, normalize_pubkey
from circles.common.once import Once
from circles.common.wire import GATEWAY, SUBPROTOCOLS
from circles.common.tls_client import client_options

# Twisted's own Logger, deliberately: the client runs in an application's process, whose observers
# decide what is kept (--log-level belongs to the server's and the worker's twistd plugins).
log = Logger()

DEFAULT_TIMEOUT = 30.0  # seconds to connect and finish the opening handshake, or to answer a ping
PING_INTERVAL = 10.0  # seconds between the pings that find a server no longer answering


class ConnectFailed(ConnectionError):
    """The connection or its opening handshake did not succeed (refused, TLS, HTTP 404...).

    ``status`` is the HTTP status of a refused upgrade (404: the server does not serve the
    circle), else None.
    """

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class CertificateNotVerified(ConnectFailed):
    """The server's certificate did not verify: an issuer not trusted, expired, another host's."""


class NoServerReachable(ConnectFailed):
    """A :class:`ReconnectingClient` got no live connection within a call's ``timeout``: none of
    its servers could be reached, or none let a WebSocket open (and authenticate). The message
    names each URL and why its last attempt failed."""


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

    def __init__(self, message: str, *, sent: bool = True, code: Optional[int] = None) -> None:
        super().__init__(message)
        self.sent = sent
        self.code = code


# -- TLS ---------------------------------------------------------------------------------------

def tls_options(host: str, ca: Optional[str] = None, insecure: bool = False) -> IOpenSSLClientConnectionCreator:
    """Client TLS for ``host``: verified against the system trust store, or ``ca`` (PEM file)."""
    if insecure:
        # Development only: any certificate, any host name.
        return CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_2)
    return client_options(host, ca)


def endpoint_for(url: str, reactor: Any, *, ca: Optional[str] = None, insecure: bool = False,
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

    def __init__(self, options: IOpenSSLClientConnectionCreator, ca: Optional[str]) -> None:
        self._options = options
        self._ca = ca

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tls_protocol)
        protocol = getattr(tls_protocol, "wrappedProtocol", None)
        if isinstance(protocol, _ClientProtocol):
            protocol.tls = (connection, self._ca)
        return connection


#: OpenSSL's verify errors for a chain that leads to no trusted root: unable to get issuer
#: certificate, self-signed certificate, self-signed certificate in chain, unable to get local
#: issuer certificate, unable to verify the first certificate.
_UNTRUSTED = {2, 18, 19, 20, 21}
#: OpenSSL's verify error for a certificate whose signature its issuer's key does not verify.
_BAD_SIGNATURE = 7


def _names(certificate: x509.Certificate) -> list:
    """The host names and addresses a certificate is for."""
    try:
        alternatives = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [a.value for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return [*alternatives.get_values_for_type(x509.DNSName),
            *(str(a) for a in alternatives.get_values_for_type(x509.IPAddress))]


def _not_verified(connection: SSL.Connection, ca: Optional[str], host: str, lost: Failure) -> str:
    """Why the server's certificate did not verify, in a few words (OpenSSL's reason for a chain
    that does not lead to a trusted root, or the names a certificate for another host carries)."""
    chain = connection.get_peer_cert_chain() or []
    if not chain:
        return lost.getErrorMessage()
    leaf = chain[0].to_cryptography()
    if lost.check(VerificationError):
        return f"it is for {', '.join(_names(leaf)) or 'no host name'}, not {host}"
    store = crypto.X509Store()
    try:
        if ca is not None:
            store.load_locations(ca)  # every certificate in it, as client_options trusts them
        else:
            paths = ssl.get_default_verify_paths()
            store.load_locations(paths.cafile, paths.capath)
        crypto.X509StoreContext(store, chain[0], chain=chain[1:]).verify_certificate()
    except crypto.X509StoreContextError as e:
        # Expired, not yet valid, revoked...: OpenSSL's words say it. But a signature that fails
        # against the --ca file's CA is a CA of the issuer's name with another key: said below.
        if e.errors[0] not in _UNTRUSTED and not (ca is not None and e.errors[0] == _BAD_SIGNATURE):
            return f"{e}"
        issuer = leaf.issuer.rfc4514_string() or "an unnamed issuer"
        if ca is None:
            return f"{e} (issued by {issuer}, not in the system trust store)"
        return f"{e} (issued by {issuer}, {_other_ca(ca, leaf)})"
    except Exception:  # only the explanation is lost
        pass
    return "certificate verify failed"


def _other_ca(ca: str, leaf: x509.Certificate) -> str:
    """What the ``--ca`` file holds instead of the server's issuer, and the likely cause: another
    CA, or one of the same name and another key (a CA made again: a development CA's name is the
    same for every one it makes in older versions, and alike in newer ones)."""
    try:
        with open(ca, "rb") as f:
            held = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError):
        return f"not in {ca}"
    if any(cert.subject == leaf.issuer for cert in held):
        return (f"and {ca} holds a CA of that name but with another key: the server's certificate was signed "
                "by another CA of the same name (one made again, e.g. by another try-out run or state "
                "directory): give the CA file that signed it")
    names = "; ".join(cert.subject.rfc4514_string() or "an unnamed CA" for cert in held[:3])
    more = f" and {len(held) - 3} more" if len(held) > 3 else ""
    return (f"but {ca} holds {names}{more}: the server's certificate was signed by another CA than that "
            "file's (made by another run or for another server?): give the CA file that signed it")


# -- the WebSocket protocol --------------------------------------------------------------------

class _ClientProtocol(WebSocketClientProtocol):
    """One connection: sends requests, matches replies to them by id."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred = Deferred()
        self.closed = Once()  # (code, reason)
        self._pending: "dict[int, tuple[Deferred, str]]" = {}
        self._ids = itertools.count(1)
        self._lost: Optional[Failure] = None
        self.tls: Optional[tuple] = None  # (OpenSSL connection, CA file) over wss://
        self.url: Optional[str] = None

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

    def _why(self, code: Optional[int], reason: Optional[str]) -> str:
        why = f"code {code}" + (f": {reason}" if reason else "")
        if self._lost is not None and not self.opened.called:
            why += f" ({self._lost.getErrorMessage()})"
        return why

    def _not_opened(self, why: str) -> ConnectFailed:
        """Why the connection did not open, as a user would say it."""
        url = self.url
        assert url is not None  # set as the connection was made
        _, host, port, resource, _, _ = parse_url(url)
        status_line = getattr(self, "http_status_line", None) or ""
        status = re.match(r"HTTP/\S+ (\d{3})\s*(.*)", status_line)
        if status and status.group(1) != "101":
            code, reason = int(status.group(1)), status.group(2).strip()
            if code == 404:
                circle = resource.split("?", 1)[0].rsplit("/", 1)[-1]
                return ConnectFailed(f"cannot open {url}: the server at {host}:{port} does not serve circle "
                                     f"{circle} (HTTP 404 {reason})", status=code)
            return ConnectFailed(f"cannot open {url}: the server at {host}:{port} refused the WebSocket upgrade "
                                 f"(HTTP {code} {reason})", status=code)
        lost = self._lost
        not_verified = lost is not None and (lost.check(VerificationError) is not None or (
            lost.check(SSL.Error) is not None and "certificate verify failed" in str(lost.value)))
        if self.tls is not None and lost is not None and not_verified:
            connection, ca = self.tls
            return CertificateNotVerified(f"cannot open {url}: certificate verify failed for {host}:{port}: "
                                          f"{_not_verified(connection, ca, host, lost)}")
        if not url.startswith("wss:") and not status_line and lost is not None and lost.check(ConnectionDone):
            # A TLS port that read "GET ..." as a handshake closes without a word; so does a load
            # balancer with no server up behind it. The first is the one a user can fix here.
            return ConnectFailed(f"cannot open {url}: the connection closed before the WebSocket opened, with no "
                                 f"answer: if {host}:{port} serves TLS, use wss:// (a TLS port closes a ws:// "
                                 "request so; so does a load balancer with no server behind it)")
        return ConnectFailed(f"cannot open {url}: the connection closed before the WebSocket opened ({why})")

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
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


def _factory(url: str, reactor: Any, timeout: float) -> WebSocketClientFactory:
    # Our contract ({output}, -32005...) on every server, one defaulting to the circles-era one too.
    factory = WebSocketClientFactory(url, reactor=reactor, protocols=[SUBPROTOCOLS[GATEWAY]])
    factory.protocol = _ClientProtocol
    factory.setProtocolOptions(openHandshakeTimeout=timeout, closeHandshakeTimeout=5,
                               autoPingInterval=PING_INTERVAL, autoPingTimeout=timeout)
    return factory


# -- the client --------------------------------------------------------------------------------

class CircleClient:
    """The JSON-RPC methods of one open connection to a circle."""

    def __init__(self, protocol: _ClientProtocol) -> None:
        self._protocol = protocol
        assert protocol.url is not None  # an open connection's
        self.url: str = protocol.url
        self.pubkey: Optional[str] = None  # the key this connection authenticated as

    def call(self, method: str, params: Any = None) -> Deferred:
        """Any JSON-RPC method; fires with its ``result`` or fails with :class:`RPCError`."""
        return self._protocol.request(method, params)

    def fetch_nonce(self, pubkey: Optional[str] = None) -> Deferred:
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

    def play(self, script: str, timeout: Optional[float] = None) -> Deferred:
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


def connect(url: str, *, reactor: Any, ca: Optional[str] = None, insecure: bool = False,
            timeout: float = DEFAULT_TIMEOUT) -> Deferred:
    """Open ``url`` (``ws://`` or ``wss://host:port/<circle>``); fires with a :class:`CircleClient`.

    Fails with :class:`ConnectFailed` when the server cannot be reached, the TLS handshake
    fails (e.g. the certificate is not trusted) or the server refuses the circle (404).
    """
    try:
        check_url(url)
        endpoint = endpoint_for(url, reactor, ca=ca, insecure=insecure, timeout=timeout)
        factory = _factory(url, reactor, timeout)
    except (ValueError, OSError) as e:
        return fail(ConnectFailed(f"cannot open {url}: {e}"))

    def not_connected(failure: Failure) -> Failure:
        if failure.check(ConnectFailed):
            return failure
        raise ConnectFailed(f"cannot open {url}: {failure.getErrorMessage()}")

    d: Deferred = endpoint.connect(factory)
    d.addCallback(lambda protocol: protocol.opened)
    d.addCallback(CircleClient)
    d.addErrback(not_connected)
    return d


@implementer(IStreamClientEndpoint)
class _Rotating:
    """Each connection attempt to the next of several servers, round robin: the WebSocket
    factory's session parameters (URL, Host header, resource) are switched to that server's
    before connecting. ClientService makes one attempt at a time, so no attempt sees another's."""

    def __init__(self, targets: "list[tuple[str, Any]]", factory: WebSocketClientFactory,
                 failed: Callable[[str, Failure], None]) -> None:
        self._targets = targets  # (url, endpoint)
        self._factory = factory
        self._failed = failed  # told of each attempt that made no connection, before ClientService
        self._next = 0
        self.url: str = targets[0][0]  # the URL of the current or last attempt

    def connect(self, protocol_factory: IProtocolFactory) -> Deferred:
        self.url, endpoint = self._targets[self._next]
        self._next = (self._next + 1) % len(self._targets)
        f = self._factory
        f.setSessionParameters(url=self.url, origin=f.origin, protocols=f.protocols, useragent=f.useragent,
                               headers=f.headers, proxy=f.proxy)
        return endpoint.connect(protocol_factory).addErrback(self._attempt_failed, self.url)

    def _attempt_failed(self, failure: Failure, url: str) -> Failure:
        if not failure.check(CancelledError):  # cancelled: stopped, not a failure of the server's
            self._failed(url, failure)
        return failure


def check_urls(urls: Union[str, Sequence[str]]) -> "list[str]":
    """``urls`` (one URL or several servers' URLs) as a list, each checked by :func:`check_url`;
    ValueError if there is none or they do not all name the same circle."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("no URL given: give at least one ws:// or wss://host:port/{circle_pk}")
    circles = {url: check_url(url) for url in urls}
    if len(set(circles.values())) > 1:
        raise ValueError("the URLs must all name the same circle (they are servers of one deployment): "
                         + ", ".join(f"{url} names {circle[:10]}…" for url, circle in circles.items()))
    return urls


class ReconnectingClient:
    """Keeps a connection to ``url`` up, authenticating every new one with a fresh nonce.

    ``url`` may be a sequence of URLs of the same circle on several servers (a deployment with no
    load balancer in front): the first attempt goes to the first, and after a failed attempt or a
    lost connection the next attempt goes to the next, round robin, so a client moves on when its
    server dies. :attr:`url` is the URL of the current (or last attempted) connection,
    :attr:`urls` all of them.

    Calls wait for a live (open and, if a key is given, authenticated) connection: for ever, or
    for ``timeout`` seconds where a call takes one (:meth:`client`, :meth:`play`), after which
    it fails with :class:`NoServerReachable`, saying why each server's last attempt failed. A
    call in flight when the connection drops fails with :class:`ConnectionClosed` and is not
    repeated; the next call goes over the new connection. Two exceptions, where repeating is
    safe: a call that never left (the connection was closing when it was made) waits for the
    next connection, ``play`` included (the server never saw it); and a call that only reads
    (:data:`RETRIED`: ``fetch_nonce``, ``whoami``, ``rpc.discover``) caught by a server going
    away (close code 1001: it is stopping, and sends that once what it took is answered) is made
    again on the next connection, without an error. A ``play`` caught in flight is never
    repeated for the caller: it fails with :class:`ConnectionClosed`. (From a circles server, one
    whose ``code`` is 1001 was not run: the server answers every call it took before it goes
    away, and takes none that crosses its close; the caller may send it again. Any other close
    leaves it unknown.) :meth:`start` begins connecting, :meth:`stop` ends it.

    Twisted's ``ClientService`` keeps the connection; this class makes it live. The service
    counts a connection as made once TCP (and TLS) is up, and the opening handshake and the
    authentication follow here: a ``prepareConnection`` that fails because the connection was
    lost leaves the service in a state (``Waiting``) where that same loss, reported next, is an
    error (``automat`` ``NoTransition``, logged as an unhandled error each time a load balancer
    with no backend or a draining server closed a connection before the WebSocket opened). An
    attempt that gives no live connection still counts as a failed one for ``retry_policy``,
    whose delays grow while no server lets a WebSocket open.
    """

    #: Calls that read only: made again when a server going away (1001) left them unanswered.
    RETRIED = frozenset({"fetch_nonce", "whoami", "rpc.discover"})
    #: How many connections a call follows before its failure is the caller's.
    MOST_ATTEMPTS = 3
    #: Seconds a connection must have lived for its server's 1001 to bring an immediate reconnection
    #: (one sent away sooner waits as after a failed attempt: no loop against a server that lets
    #: clients in only to send them away).
    SETTLED = 1.0

    def __init__(self, url: Union[str, Sequence[str]], *, reactor: Any, key: Optional[PrivateKeyLike] = None,
                 scheme: str = "eth", ca: Optional[str] = None, insecure: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, retry_policy: Optional[Callable[[int], float]] = None) -> None:
        self.urls: "list[str]" = check_urls(url)
        self._reactor = reactor
        self._key = None if key is None else private_key(key)
        self._scheme = scheme
        self._policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=30)
        self._unready = 0  # attempts in a row that gave no live connection
        self._went_away = False  # the last live connection, settled, was closed by its server going away (1001)
        self._live_since = 0.0
        self._why: "dict[str, str]" = {}  # each URL's last failed attempt, since the last live connection
        self._live: Optional[_ClientProtocol] = None
        self._waiters: "list[Deferred]" = []  # calls waiting for a live connection
        self._stopped = False
        #: Live connections made so far (open, and authenticated if a key is given).
        self.connections = 0
        factory = _factory(self.urls[0], reactor, timeout)
        self._endpoint = _Rotating([(u, endpoint_for(u, reactor, ca=ca, insecure=insecure, timeout=timeout))
                                    for u in self.urls], factory, self._attempt_failed)
        # The service's own count of failed attempts restarts with every TCP connection; ours
        # restarts with every live one (1 after a live connection was lost, as the service's would).
        self._service = ClientService(self._endpoint, factory,
                                      retryPolicy=self._delay,
                                      clock=reactor, prepareConnection=self._prepare)

    @property
    def url(self) -> str:
        return self._endpoint.url

    def _prepare(self, protocol: Any) -> None:  # a _ClientProtocol
        """Each new connection, as soon as TCP (and TLS) is up: its handshake and authentication
        go on in the background; the service takes the connection as made (see the class)."""
        ensureDeferred(self._make_live(protocol.opened, protocol.url))

    async def _make_live(self, opened: Deferred, url: str) -> None:
        protocol: Optional[_ClientProtocol] = None
        try:
            protocol = await opened
            if self._key is not None:
                await CircleClient(protocol).authenticate(self._key, self._scheme)
        except Exception:
            failure = Failure()
            log.warn("connecting to {url} failed: {error}", url=url, error=failure.getErrorMessage())
            self._attempt_failed(url, failure)
            if protocol is not None and protocol.state == protocol.STATE_OPEN:
                protocol.sendClose(1000)  # not used; the service tries again once it has closed
            return
        self._unready, self._why = 0, {}
        self._live = protocol
        self._live_since = self._reactor.seconds()
        self.connections += 1
        protocol.closed.when().addCallback(lambda closed: self._lost(protocol, closed[0]))
        log.info("connected to {url}", url=protocol.url)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._wrap(protocol))

    def _attempt_failed(self, url: str, failure: Failure) -> None:
        self._unready += 1
        self._why[url] = failure.getErrorMessage().removeprefix(f"cannot open {url}: ")

    def _lost(self, protocol: _ClientProtocol, code: Optional[int]) -> None:
        if self._live is protocol:
            self._live = None
            self._went_away = code == GOING_AWAY and self._reactor.seconds() - self._live_since >= self.SETTLED

    def _delay(self, _attempts: int) -> float:
        """Seconds before the next attempt: none after a server went away (it stopped on purpose,
        having answered all it took; another is up), else ``retry_policy``'s for the attempts in
        a row that gave no live connection."""
        if self._went_away and not self._unready:
            return 0.0
        return self._policy(max(1, self._unready))

    def _wrap(self, protocol: _ClientProtocol) -> CircleClient:
        client = CircleClient(protocol)
        client.pubkey = None if self._key is None else public_key(self._key)
        return client

    def _unreachable(self, timeout: float) -> NoServerReachable:
        tried = "; ".join(f"{url}: {self._why.get(url, 'no attempt has finished yet')}" for url in self.urls)
        return NoServerReachable(f"no server was reachable within {timeout:g} s ({tried})")

    def start(self) -> None:
        self._stopped = False
        self._service.startService()

    def stop(self) -> Deferred:
        """Stop connecting and close the connection; calls still waiting for one fail with
        ``CancelledError``."""
        self._stopped = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.cancel()
        return self._service.stopService()

    def client(self, timeout: Optional[float] = None) -> Deferred:
        """Fires with a :class:`CircleClient` on the current live connection, or the next one.

        ``timeout``: seconds to wait for one, after which it fails with :class:`NoServerReachable`
        (None: wait for as long as it takes). Fails with ``CancelledError`` once stopped.
        """
        if self._stopped:
            return fail(CancelledError(f"the client of {self.url} was stopped"))
        live = self._live
        if live is not None and live.state == live.STATE_OPEN:
            return succeed(self._wrap(live))
        waiter: Deferred = Deferred(self._forget)
        self._waiters.append(waiter)
        if timeout is not None:
            def unreachable(result: Any, timeout: float) -> Any:
                if isinstance(result, Failure) and result.check(CancelledError):
                    raise self._unreachable(timeout)
                return result

            waiter.addTimeout(timeout, self._reactor, onTimeoutCancel=unreachable)
        return waiter

    def _forget(self, waiter: Deferred) -> None:
        """A waiter cancelled (its timeout, its caller): nothing keeps it any more."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _via(self, method: str, *args: Any, rpc: Optional[str] = None, **kwargs: Any) -> Deferred:
        """``method`` of the live connection's :class:`CircleClient`, made again on the next
        connection where that is safe (see the class); ``rpc``: the JSON-RPC method it calls."""
        return ensureDeferred(self._calling(method, rpc or method, args, kwargs))

    async def _calling(self, method: str, rpc: str, args: tuple, kwargs: dict) -> Any:
        for attempt in range(1, self.MOST_ATTEMPTS + 1):
            client = await self.client()
            try:
                return await getattr(client, method)(*args, **kwargs)
            except ConnectionClosed as e:
                again = not e.sent or (e.code == GOING_AWAY and rpc in self.RETRIED)
                if not again or attempt == self.MOST_ATTEMPTS:
                    raise
                log.info("{method} to {url} again on the next connection ({why})", method=rpc, url=client.url,
                         why="the server is going away" if e.sent else "it was not sent")

    def call(self, method: str, params: Any = None) -> Deferred:
        return self._via("call", method, params, rpc=method)

    def fetch_nonce(self, pubkey: Optional[str] = None) -> Deferred:
        """``{nonce, expires_at}``; the nonce is bound to ``pubkey`` when given, and to the
        connection it was fetched on (another after a reconnection)."""
        return self._via("fetch_nonce", pubkey)

    def whoami(self) -> Deferred:
        return self._via("whoami")

    def play(self, script: str, timeout: Optional[float] = None) -> Deferred:
        """Run ``script``; fires with its output.

        ``timeout`` (seconds) bounds the whole call: waiting for a live connection (past it,
        :class:`NoServerReachable`), then the play itself, sent with the time left as its own
        timeout, so the server answers -32003 when that runs out. None: the server's limit, and
        as long as it takes to connect.
        """
        if timeout is None:
            return self._via("play", script)
        return ensureDeferred(self._play_within(script, timeout))

    async def _play_within(self, script: str, timeout: float) -> str:
        deadline = self._reactor.seconds() + timeout
        for attempt in range(1, self.MOST_ATTEMPTS + 1):
            client = await self.client(timeout=max(deadline - self._reactor.seconds(), 0.001))
            try:
                # What is left of it, and never 0 (the server refuses that): the connection came at the deadline.
                return await client.play(script, timeout=max(deadline - self._reactor.seconds(), 0.001))
            except ConnectionClosed as e:
                if e.sent or attempt == self.MOST_ATTEMPTS:
                    raise  # it may have run: never repeated
        raise AssertionError("the last attempt returns or raises")

    def discover(self) -> Deferred:
        return self._via("discover", rpc="rpc.discover")
