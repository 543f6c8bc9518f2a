"""The WebSocket side of a circle session: one protocol instance per client.

Wire protocol
=============

A client opens a WebSocket to ``/{circle_pk}``, where ``circle_pk`` is the circle's secp256k1
public key in compressed hex (66 characters) or uncompressed (130, as the Rust circles server's
clients often write it: the same circle). A path that is not such a key, or names a circle
this server does not serve, is refused during the opening handshake with HTTP 404. Every refused
upgrade (404, 403, 401, 503) answers a JSON body ``{"error": reason}``; a plain HTTP request on a
circle's path (no ``Upgrade: websocket``) is 426 with one saying to use a WebSocket client.

Every message after that is one UTF-8 **text** frame holding one JSON-RPC 2.0 request,
notification or batch; the server answers each request with one text frame holding the
response (or the batch of responses), and sends nothing for notifications. Replies to
different requests may arrive in any order (a slow ``play`` does not hold back a ``whoami``);
match them by ``id``.

Methods (``openrpc.json`` is the full contract, ``rpc.discover`` returns it)::

    fetch_nonce  {pubkey?}                    -> {nonce, expires_at}
    authenticate {pubkey?, signature, nonce?} -> {authenticated: true, pubkey}
    whoami                                    -> {circle, authenticated, pubkey}
    play         {script, timeout?}           -> {output}
    rpc.discover                              -> the OpenRPC document

Contracts: the above is ours. A client that offers the WebSocket subprotocol
``circles-gateway.v1`` gets it on any server; one that offers ``circles-era.v1`` gets the
original circles server's (``play`` answers the output as a string, ``authenticate``
``{authenticated: true}``, a failed script -32000 "Execution Error", -32001 "Authentication
Required", -32002 "Invalid Credentials"), ``circles-hero.v1`` its hero generation's
(``fetch_nonce`` answers the nonce string, ``authenticate`` true); one that offers none of them
gets the server's ``--api`` (``gateway`` by default, ``circles`` for a deployment replacing a
Rust circles server). The
server answers with the subprotocol it chose, or none. ``rpc.discover`` describes what the
connection gets (each contract is one object: ``circles.server.session.contracts``).

Authentication: ``fetch_nonce`` returns a single-use nonce (128 bits, hex) that expires at
``expires_at`` (Unix seconds) and is bound to this connection and to ``pubkey``. The client
signs the nonce string's UTF-8 bytes, either with Ethereum ``personal_sign`` (65-byte
``r||s||v``) or plain ECDSA over SHA-256 (64-byte ``r||s`` or DER), and sends
``authenticate`` (``pubkey`` may be left out with a ``personal_sign`` signature, whose key is
recovered: browser wallets expose addresses, not keys). ``nonce`` names the nonce signed;
without it the newest one fetched for that key (else without a key) is meant, and only that one
is checked. A ``personal_sign`` signature must be low-S (EIP-2). From then on the session acts
as that key; with ``--auth`` on, ``play`` requires it. Authentication lasts as long as the
connection.

Earlier clients of the ecosystem may instead get a nonce from ``GET /auth/nonce?public_key=``
and open ``/{circle_pk}?pubkey=<hex>&sig=<hex>&nonce=<nonce>``: the session then starts
authenticated, and a bad, partial or replayed proof refuses the upgrade with HTTP 401. Such a
nonce is kept in Redis (:mod:`circles.server.access.redis_nonces`), so the WebSocket may land on any process
or server sharing it; the handshake waits for Redis to take it (reading nothing more from the
client meanwhile), at most the store's timeout, and is refused with 503 when Redis cannot say.
Such a nonce is bound to no connection: ``authenticate`` takes it too, named by ``nonce``, on
any connection, once (any attempt uses it up); the requests sent after that ``authenticate``
wait for Redis's answer (nothing more is read meanwhile, :meth:`CircleProtocol._hold`), which is
-32004 when Redis cannot say. A nonce from ``fetch_nonce`` is bound to its connection: a URL, or
another connection's ``authenticate``, refuses it (401, -32002). They may
also send ``authenticate`` as ``{credentials: {pubkey, signature}}``, ``[pubkey, signature]``
or ``[{pubkey, signature}]``, and ``fetch_nonce`` with no key (the nonce is then bound to this
connection only, and to whichever key signs it).

Errors are JSON-RPC error objects: -32700 parse error, -32600 invalid request, -32601 method
not found, -32602 invalid params, -32603 internal error, and the application's -32001
authentication required, -32002 authentication failed, -32003 script timed out, -32004 script
backend unavailable, -32005 script failed (``data`` carries the worker's error), -32006 too
many requests, -32007 reply too large.

Replies are bounded by the same size limit as requests, decided before sending: a response
whose encoded UTF-8 text would exceed it becomes -32007 with the request's id and ``data``
``{size, limit}`` (the reply's would-be size in bytes); in a batch the largest responses are
replaced so, largest first, until the batch fits, and the rest are answered as usual.

A client that does not read its replies is not read from either, and what it may leave unread
is bounded (:mod:`circles.server.session.backlog`): a ``play`` reply that would take it past twice the size
limit is answered -32007 with ``data`` ``{size, unread, limit}`` instead, and a client that stays
over that bound for ``--slow-reader-timeout`` seconds (or is so far over it that not even the
error fits) is disconnected without a close frame (it would not read one).

Close codes: 1001 (going away) when the server stops: sent once every request the connection
had in flight is answered; a request that crosses it is not taken (never run), so a client may
send it again elsewhere. 1003 for a binary frame (only text is spoken here), 1007 for a text frame that is
not UTF-8, 1009 for a message over the size limit or in more than ``--max-fragments`` frames,
and for a reply that cannot fit even as -32007 errors (the request's ids alone are too long to
echo).
"""

from __future__ import annotations

import itertools
from typing import Any

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from circles.backend.scripts import BackendUnavailable
from circles.common.jsonrpc import ReplyTooLarge, is_deferred
from circles.common.keys import PATH_KEY_LENGTHS, InvalidKey, normalize_pubkey
from circles.common.logs import Logger
from circles.common.once import Once
from circles.common.signatures import AuthenticationFailed
from circles.common.timers import TimerLane
from circles.server.access.limits import ConnectionCount, OriginPolicy, address_key
from circles.server.gateway import Gateway
from circles.server.session.backlog import Backlog
from circles.server.session.contracts.base import Contract
from circles.server.session.methods import Session, Sessions
from circles.server.tls import release_buffers
from circles.server.websocket import TrimmedServerFactory, TrimmedServerProtocol

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_MESSAGE_TOO_BIG = 1009

#: A TLS connection's memory BIOs keep the largest buffer they ever needed (circles.server.tls.release_buffers):
#: let go of what its opening handshake left, and of any read or write of more than TLS_BUFFER_SLACK
#: bytes, TLS_BUFFERS_IDLE seconds later (once nothing is on its way).
TLS_BUFFER_SLACK = 2048
TLS_BUFFERS_IDLE = 1.0

_connection_ids = itertools.count(1)
# Our own logger: the protocol's ``self.log`` belongs to Autobahn, whose debug chatter txaio filters.
log = Logger()


def circle_from_path(path: str) -> str | None:
    """The circle id a request path names, or None if it names none."""
    name = path[1:] if path.startswith("/") else path
    if len(name) not in PATH_KEY_LENGTHS:
        return None
    try:
        return normalize_pubkey(name)
    except InvalidKey:
        return None


def _url_refused(failure: Failure):
    """Why the nonce store refused a URL proof, as the upgrade's refusal: 401 for a bad proof,
    503 when the store cannot say (Redis unreachable, or not answering in time), never a
    traceback."""
    if failure.check(AuthenticationFailed):
        raise ConnectionDeny(401, f"Authentication failed: {failure.value}")
    if failure.check(BackendUnavailable):
        raise ConnectionDeny(503, "Nonce store unavailable, retry later")
    log.failure("checking a URL proof failed", failure)
    raise ConnectionDeny(500, "Internal server error")


class CircleProtocol(TrimmedServerProtocol):
    """Speaks JSON-RPC for one client; the :class:`Session` holds its state."""
    transport: Any  # set before any callback: TCP, TLS or unix, a producer and consumer too
    # Autobahn's options, set on the factory's protocol class (CircleFactory.__init__).
    tcpNoDelay: bool
    logOctets: bool
    # One buffer per message (see onMessageFrameData), where Autobahn keeps lists.
    message_data: Any
    frame_data: Any

    max_fragments = 0  # frames a message may come in (0: any number); the factory sets Config.max_fragments

    __slots__ = ("connection_id", "session", "_idle", "_counted", "_backlog", "_proof", "_fragments", "_tls_buffers")

    def __init__(self) -> None:
        # Opened by onConnect; every callback after it has one (only onClose may come without).
        self.session: Session = None  # type: ignore[assignment]
        self._idle: TimerLane | None = None  # the factory's idle timers, while this connection is in them
        self._counted: str | None = None  # the peer's address key, while counted against the limits
        self._backlog: Backlog | None = None  # what the peer has not read, once open
        self._proof: Deferred | None = None  # an authenticate waiting for the shared nonce store (see _hold)
        self._fragments = 0  # frames of the message arriving so far
        self._tls_buffers: TimerLane | None = None  # over TLS, once open: when to let go of its buffers
        super().__init__()

    def onConnect(self, request):
        self.connection_id = next(_connection_ids)
        gateway: Gateway = self.factory.gateway
        if not self.factory.origins.allows(request.origin):
            raise ConnectionDeny(403, "Origin not allowed")
        circle = circle_from_path(request.path)
        if circle is None or not gateway.config.serves(circle):
            raise ConnectionDeny(404, "No such circle")
        peer = self.transport.getPeer()
        peer_host = getattr(peer, "host", str(peer))
        counted = address_key(peer_host)  # an IPv6 peer by its /64
        refused = self.factory.connections.admit(counted)
        if refused is not None:
            raise ConnectionDeny(503, refused)
        self._counted = counted
        contract, subprotocol = self.factory.sessions.negotiate(request.protocols)
        proof = self._url_proof(request.params)
        if proof is None:
            self._open_session(None, circle, contract, peer_host)
            return subprotocol
        proved = gateway.http_nonces.redeem_value(*proof)
        # Callbacks, not a coroutine: per handshake, and answered at once by a store in memory.
        proved.addCallbacks(self._open_session, _url_refused, callbackArgs=(circle, contract, peer_host))
        proved.addCallback(lambda _: subprotocol)
        if proved.called:  # a store in memory answers at once
            return proved
        # Redis answers later (within the store's timeout, at most the handshake's). Meanwhile
        # nothing more is read: what a client sends before the answer stays in the kernel, not
        # here, and cannot start a second handshake on this connection.
        self.transport.pauseProducing()
        answer: Deferred = Deferred()
        proved.addBoth(self._proof_checked, answer)
        return answer

    def _open_session(self, pubkey: str | None, circle: str, contract: Contract, peer_host: str) -> None:
        self.session = self.factory.sessions.open(circle, pubkey, self.connection_id, peer_host, contract)
        log.debug("connection {conn} opened on circle {circle} from {peer} as {pubkey}",
                  conn=self.connection_id, circle=circle, peer=self.peer, pubkey=pubkey)

    def _proof_checked(self, result, answer: Deferred) -> None:
        """The nonce store answered a handshake waiting for it: go on with it, unless the client
        left meanwhile (then nobody is answered, and no session is left open)."""
        if self.state != self.STATE_CONNECTING:
            if self.session is not None:
                self.session.close()
            return None
        self.transport.resumeProducing()
        if isinstance(result, Failure):
            answer.errback(result)
        else:
            answer.callback(result)
        return None

    def onOpen(self) -> None:
        factory: CircleFactory = self.factory
        factory.open_connections.add(self)
        # The HTTP channel that accepted the upgrade is still the transport's producer; the
        # WebSocket takes its place (Autobahn unregisters ours when the connection drops):
        # while the peer does not read our replies, we do not read its requests, and what it
        # leaves unread is bounded (circles.server.session.backlog).
        self.transport.unregisterProducer()
        config = self.session.gateway.config
        self._backlog = Backlog(self, self.transport, self.session.gateway.clock, 2 * config.max_message_size,
                                config.slow_reader_timeout)
        self.registerProducer(self._backlog, True)
        self.session.reply_room = self._backlog
        idle = factory.idle_timers
        if idle is not None:
            idle.set(self)
            self._idle = idle
        if self._transport_details is not None and self._transport_details.is_secure:
            self._tls_buffers = factory.tls_buffer_timers
            self._tls_buffers.set(self)  # what the opening handshake left in its buffers
        if factory.draining:
            self.go_away()

    @staticmethod
    def _url_proof(params: dict) -> tuple | None:
        """``(nonce, pubkey, sig)`` from ``?pubkey=&sig=&nonce=`` (a nonce from GET /auth/nonce),
        if given, for the gateway's HTTP nonce store to check.

        A partial proof, or a malformed key, refuses the upgrade at once; so does a bad or
        replayed proof once the store has said so, rather than opening an anonymous session the
        client would mistake for an authenticated one.
        """
        names = ("pubkey", "sig", "nonce")
        given = {name: params[name][0] for name in names if params.get(name)}
        if not given:
            return None
        if len(given) < len(names):
            raise ConnectionDeny(401, "URL authentication needs pubkey, sig and nonce")
        try:
            pubkey = normalize_pubkey(given["pubkey"])
        except InvalidKey as e:
            raise ConnectionDeny(401, f"Authentication failed: {e}") from None
        return given["nonce"], pubkey, given["sig"]

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != self.STATE_OPEN:
            # Our close frame is on its way (1001 going away, or any close we started) and this
            # request crossed it: it is not taken. So a client told 1001 knows that every call
            # it had no answer to was never run (the server answers all it took first).
            return
        if isBinary:
            # sendClose() only takes application codes (1000, 3000-4999) and raises on 1003;
            # sendCloseFrame() sends a protocol code and starts the closing handshake.
            self.sendCloseFrame(CLOSE_UNSUPPORTED_DATA, b"binary frames are not supported: send JSON-RPC as text")
            return
        if self._idle is not None:
            self._idle.reset(self)
        try:
            reply = self.session.answer(payload)
        except ReplyTooLarge as e:
            self._unsendable(e)
            return
        if is_deferred(reply):  # callbacks, not a coroutine: per message (the hot path)
            reply.addCallback(self._reply)
            # The dispatcher answers every failure itself; anything reaching here is our bug.
            reply.addErrback(self._reply_failed)
            if self.session.proving is not None:
                self._hold(self.session.proving)
        else:
            self._reply(reply)

    def _hold(self, proof: Deferred) -> None:
        """An ``authenticate`` waits for the shared nonce store (Redis): the requests after it wait
        for its answer, so that one sent after it (a play) runs as the key it proves. Meanwhile
        nothing more is read (what the client sends stays in the kernel, not here), nor are the
        frames a read already brought processed (:meth:`holding`); at most the store's timeout."""
        if self._proof is None:
            self.transport.pauseProducing()
        self._proof = proof
        proof.addBoth(self._proved, proof)

    def _proved(self, result, proof: Deferred):
        """The store answered ``proof`` (and the calls after it in its batch have started): go on
        reading, unless another ``authenticate`` of that batch waits now."""
        if self._proof is proof:
            self._proof = None
            following = self.session.proving
            if following is not None:
                self._hold(following)
            elif self.state == self.STATE_OPEN or self.state == self.STATE_CLOSING:
                if self._backlog is None or not self._backlog.paused:  # else it resumes once drained
                    self.transport.resumeProducing()
                self.consumeData()
        return result

    def _reply(self, text: str | None) -> None:
        if text is not None and self.state == self.STATE_OPEN:
            self.sendMessage(text.encode("utf-8"))
        if self.factory.draining and not self.session.in_flight:
            self.go_away()

    def _reply_failed(self, failure) -> None:
        if failure.check(ReplyTooLarge):
            self._unsendable(failure.value)
            return
        log.failure("reply to connection {conn} failed", failure, conn=self.connection_id)

    def _unsendable(self, error: ReplyTooLarge) -> None:
        """No reply fits, not even an error (the request's id is too long to echo): 1009. Or, on a
        connection whose peer has left its bound of replies unread, not even the error that says
        so: that peer is not reading, and is given up at once."""
        if self._backlog is not None and error.limit < self.session.gateway.config.max_message_size:  # held to its room
            self.backlog_stuck(self._backlog.unread)
            return
        self.session.anomalies.note("reply too large", "connection {conn}: reply of {size} bytes over the limit "
                                    "of {limit}, even as an error: closing with 1009", size=error.size,
                                    limit=error.limit)
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(CLOSE_MESSAGE_TOO_BIG, b"reply too large")

    # Autobahn's paths, trimmed (circles.server.websocket), with this protocol's own parts.

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self._backlog is not None:
            self._backlog.stop()
        if self._counted is not None:
            self.factory.connections.release(self._counted)
            self._counted = None

    def wrote(self, size: int) -> None:
        if self._backlog is not None:
            self._backlog.wrote(size)
        if size > TLS_BUFFER_SLACK and self._tls_buffers is not None:
            self._tls_buffers.set(self)

    def dataReceived(self, data: bytes) -> None:
        if len(data) > TLS_BUFFER_SLACK and self._tls_buffers is not None:
            self._tls_buffers.set(self)
        self._dataReceived(data)

    @staticmethod
    def _tls_buffers_idle(protocol: CircleProtocol) -> None:
        protocol._release_tls_buffers()

    def _release_tls_buffers(self) -> None:
        """:data:`TLS_BUFFERS_IDLE` seconds after it opened, or read or wrote more than
        :data:`TLS_BUFFER_SLACK` bytes at once: let go of what its TLS buffers kept of it
        (:func:`circles.server.tls.release_buffers`); while ciphertext is on its way, again later."""
        if self.state == self.STATE_OPEN and self._tls_buffers is not None:
            if not release_buffers(self.transport.getHandle()):
                self._tls_buffers.set(self)

    def holding(self) -> bool:
        """While the transport is paused (the peer does not read what we send) the frames a read
        already brought wait too: 64 KiB of small requests, each answered at once, could otherwise
        make megabytes of replies nobody reads. They are processed once the transport has sent
        everything (:meth:`backlog_drained`). So do they while an ``authenticate`` waits for the shared
        nonce store (:meth:`_hold`)."""
        backlog = self._backlog
        return (backlog is not None and backlog.paused) or self._proof is not None

    # A message may come in at most ``max_fragments`` frames (1009 past it).

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._fragments = 0

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        self._fragments += 1
        if self.max_fragments and self._fragments > self.max_fragments and not self.failedByMe:
            self.session.anomalies.note("too many fragments", "connection {conn}: a message in more than {limit} "
                                        "fragments: closing with 1009", limit=self.max_fragments)
            self.failedByMe = True  # what arrives of the message from now on is dropped
            self.sendCloseFrame(CLOSE_MESSAGE_TOO_BIG, b"message in too many fragments")

    def backlog_drained(self) -> None:
        """The peer has read everything sent: the frames held back meanwhile go on (once no
        ``authenticate`` waits: until then nothing is read)."""
        if self._proof is not None:
            self.transport.pauseProducing()  # the backlog resumed it
            return
        if self.data and (self.state == self.STATE_OPEN or self.state == self.STATE_CLOSING):
            self.consumeData()

    def backlog_stuck(self, unread: int) -> None:
        """Over its bound of unread replies for ``slow_reader_timeout`` seconds, or so far over it
        that not even an error fits: given up. Aborted, since a client that does not read would
        not read a close frame either."""
        gateway: Gateway = self.factory.gateway
        assert self._backlog is not None  # what calls this
        self.session.anomalies.note("slow reader", "connection {conn}: does not read its replies ({unread} bytes "
                                    "unread, over the limit of {limit}): closing", unread=unread,
                                    limit=self._backlog.limit)
        gateway.metrics.slow_reader_closes.inc()
        self.wasNotCleanReason = "the peer did not read its replies"
        self.drop(abort=True)

    def unread_grace(self) -> float:
        """A closing connection's replies still queued get what an open one's get: --slow-reader-timeout."""
        return self.factory.gateway.config.slow_reader_timeout

    def refusing(self, reason: str, code: int, responseHeaders) -> tuple:
        """The refusal logged within the gateway's budget; a plain GET on a circle answered 426
        with ``Upgrade: websocket`` (a browser's address bar, curl: RFC 9110 wants Upgrade)."""
        peer = self.transport.getPeer()
        self.factory.gateway.refusal_log.note(getattr(peer, "host", str(peer)), str(code),
                                              "refused a WebSocket upgrade from {peer}: {status} {reason}",
                                              status=code, reason=reason)
        if code == 426:
            return "Upgrade Required", [*(responseHeaders or ()), ("Upgrade", "websocket")], NOT_A_WEBSOCKET
        return reason, responseHeaders, None

    @staticmethod
    def _idle_expired(protocol: CircleProtocol) -> None:
        protocol._idle_timeout()

    def _idle_timeout(self) -> None:
        self._idle = None
        # An anomaly, logged within bounds: a client can leave as many connections idle as it may open.
        self.session.anomalies.note("idle timeout", "connection {conn} idle for {seconds}s: closing",
                                    seconds=self.session.gateway.config.idle_timeout)
        self.sendClose(1000, "idle timeout")

    def go_away(self) -> None:
        """Close with 1001 (going away): the server is shutting down."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(CLOSE_GOING_AWAY, b"server shutting down")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._idle is not None:
            self._idle.cancel(self)
            self._idle = None
        if self._tls_buffers is not None:
            self._tls_buffers.cancel(self)
            self._tls_buffers = None
        if self.session is not None:
            self.session.close()
            self.session.anomalies.closed()
            log.debug("connection {conn} closed (code {code}): circle {circle}, from {peer}, as {pubkey}",
                     conn=self.connection_id, code=code, circle=self.session.circle, peer=self.peer,
                     pubkey=self.session.pubkey)
        self.factory.closed(self)


#: The 426 answer to a plain HTTP request on a circle's path.
NOT_A_WEBSOCKET = ("this is a circle's WebSocket: connect with a WebSocket client (ws:// or wss://), "
                   "not a plain HTTP request")


class CircleFactory(TrimmedServerFactory):
    """Builds a :class:`CircleProtocol` per client, each opening its session with ``sessions``
    (the server's session layer, on its :class:`Gateway`), and knows the open connections so
    shutdown can let them finish and say goodbye."""

    protocol = CircleProtocol
    noisy = False  # no "Starting factory <...>" lines (circles.common.logs: what info shows)

    def __init__(self, sessions: Sessions, url: str | None = None, time_handshake: bool = True) -> None:
        """``time_handshake=False`` leaves the opening-handshake deadline to what is in front
        (:class:`~circles.server.http.upgrade.UpgradeRouter` bounds the whole request head, and once the
        head is in, ``onConnect`` answers at once, or, with URL authentication, once the nonce
        store answers, which it does within its own timeout: the service makes that at most the
        handshake's), saving Autobahn a timer per connection."""
        self.sessions = sessions
        self.gateway = gateway = sessions.gateway
        super().__init__(gateway.clock, url, server="circles")  # Autobahn's timers exact, on the gateway's clock
        self.open_connections: set = set()  # open WebSockets, for shutdown and the metrics
        gateway.metrics.watch_connections(lambda: len(self.open_connections))
        self.connections = ConnectionCount(gateway.config.max_connections, gateway.config.max_connections_per_ip)
        self.origins = OriginPolicy(gateway.config.allowed_origins)
        self._drained: Once | None = None  # while draining: fires once no connection is left
        config = gateway.config
        self.setProtocolOptions(
            maxMessagePayloadSize=config.max_message_size,
            maxFramePayloadSize=config.max_message_size,
            openHandshakeTimeout=config.handshake_timeout if time_handshake else 0,
            closeHandshakeTimeout=5,
            autoPingInterval=config.ping_interval,
            # Exactly --ping-timeout after the ping (TrimmedServerFactory); 0 never happens (the option is positive).
            autoPingTimeout=config.ping_timeout,
            # Origins are checked in onConnect (OriginPolicy), where a refusal can be 403.
            allowedOrigins=["*"],
            allowNullOrigin=True,
            # Autobahn's default fails a connection by dropping TCP without a close frame,
            # so the client would see 1006, never the 1007/1009 documented above.
            failByDrop=False,
            webStatus=False,  # a plain GET on a circle is 426 Upgrade Required, not a status page
        )
        # Set once (TrimmedServerFactory): nothing is copied or printed per connection.
        self.fix_protocol_options(max_fragments=config.max_fragments)
        #: Every open connection's idle timeout, in one lane of timers (None: no idle timeout).
        self.idle_timers: TimerLane | None = (
            self.timers.lane(config.idle_timeout, CircleProtocol._idle_expired) if config.idle_timeout else None)
        #: When TLS connections let go of what their buffers kept (CircleProtocol._release_tls_buffers).
        self.tls_buffer_timers = self.timers.lane(TLS_BUFFERS_IDLE, CircleProtocol._tls_buffers_idle)

    def closed(self, protocol: CircleProtocol) -> None:
        self.open_connections.discard(protocol)
        if self._drained is not None and not self.open_connections:
            drained, self._drained = self._drained, None
            drained.fire(None)

    @property
    def draining(self) -> bool:
        """Shutting down: the gateway's flag, which ``play`` reads too."""
        return self.gateway.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.gateway.draining = value

    def drain(self) -> Deferred:
        """Stop serving: every connection closes with 1001 once its in-flight calls are
        answered. Fires when all are closed (the caller bounds the wait)."""
        self.draining = True
        for protocol in list(self.open_connections):
            if protocol.session is None or not protocol.session.in_flight:
                protocol.go_away()
        if not self.open_connections:
            return succeed(None)
        if self._drained is None:
            self._drained = Once()
        return self._drained.when()

    def close_all(self) -> None:
        """Say goodbye to every connection now, whatever it still has in flight."""
        self.draining = True
        for protocol in list(self.open_connections):
            protocol.go_away()
