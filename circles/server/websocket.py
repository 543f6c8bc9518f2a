"""Autobahn's WebSocket server, trimmed: where circles leans on Autobahn's internals, here only.

Autobahn's per-message and per-connection paths build debug-log arguments eagerly (qualified
names, peer strings, a connection-lost reason's whole traceback), whatever the log level, and
fire a "message" event through txaio futures for observers never registered here: a quarter of
the CPU a small message costs and a tenth of a handshake's. :class:`TrimmedServerProtocol`
overrides those paths, each keeping everything else the original does;
:class:`TrimmedServerFactory` gives Autobahn's timers exact deadlines on an injected clock and
sets the protocol options once per factory instead of once per connection.
:class:`circles.protocol.CircleProtocol` builds on them.

An idle connection costs memory, not CPU, and a server holds tens of thousands: Autobahn gave
each an instance dict of some 70 attributes (1.6 kB), kept its opening handshake (2 kB), made a
send queue, two futures, a UTF-8 validator, traffic counters and event lists for it whether used
or not, and a timer of the clock for each of its deadlines. Here its state is in slots
(:data:`AUTOBAHN_STATE`), the handshake is let go once open, what only some connections use is
made when first used, and the timers of one delay share one call of the clock
(:class:`~circles.common.timers.TimerLane`): 4 kB of resident memory per idle connection where it was 10.7 kB
(docs/benchmarks.md).

Autobahn internals relied on (pyproject.toml pins Autobahn's line, and ``tests/unit/test_protocol.py``
holds the digests of the Autobahn source each override was written against: an Autobahn that
changes any of it fails there first):

- the private steps of a connection's life that the overrides call: ``_connectionMade``,
  ``_connectionLost``, ``_dataReceived``, ``_onMessage``, ``_onOpen`` and ``_closeConnection``,
  overridden; ``WebSocketProtocol.__init__``, copied; ``succeedHandshake``, which fires
  ``is_open`` just after ``_onOpen`` and reads nothing of the handshake after it;
- the attributes Autobahn keeps per connection (:data:`AUTOBAHN_STATE`, in slots; one it adds
  goes to the instance dict, costing memory, not correctness), ``utf8validator``,
  ``trafficStats``, ``send_queue`` and the event lists of ``ObservableMixin``;
- ``_transport_details``, the transport's details that ``connectionMade`` sets;
- ``autobahn.util._is_tls_error`` and ``_maybe_tls_reason``, as Autobahn's ``connectionLost`` uses them;
- the factory's ``_batched_timer``, whose ``call_later`` makes every timer of a connection
  (ping, pong, opening and closing handshakes);
- ``CONFIG_ATTRS``, the options Autobahn copies from the factory onto each new protocol;
- the attributes a message is gathered in (``message_data``, ``frame_data``, ``data``).
- ``processData`` and ``sendMessage``, overridden with a short way for the usual frame (a whole
  masked text message in one frame; an unfragmented text reply): what they check and count
  (the size limits, UTF-8, the traffic counters, the ping timeout restarted by traffic), and
  ``_cancelAutoPingTimeoutCall``, ``utf8validateIncoming``, ``applyMask``, ``autoFragmentSize``,
  ``maskServerFrames``, ``logFrames`` and ``trackedTimings``, read to decide when the short way applies.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import txaio
from autobahn.twisted.util import peer2str
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import _is_tls_error, _maybe_tls_reason
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from circles.common.eager import CLOSE_GRACE, close_in_order
from circles.common.logs import Logger
from circles.common.timers import TimerLane, TimerLanes

log = Logger()


#: What Autobahn keeps of each connection, in slots of :class:`TrimmedServerProtocol` rather than
#: an instance dict: some 70 attributes made a dict of 1.6 kB per connection, where a slot costs 8
#: bytes. An attribute Autobahn adds that is not named here goes to the instance dict as before
#: (it costs memory, not correctness). Autobahn's options (``CONFIG_ATTRS``) are not here: they are
#: attributes of the factory's protocol class (``fix_protocol_options``).
AUTOBAHN_STATE = (
    # the life of a connection (__init__, connectionMade, _connectionMade, the closing handshake)
    "factory", "transport", "connected", "_valid_events", "_results", "_transport_details", "peer",
    "_perMessageCompress", "trackedTimings", "trafficStats", "state", "send_state", "data", "send_queue",
    "triggered", "wasMaxFramePayloadSizeExceeded",
    "wasMaxMessagePayloadSizeExceeded", "closedByMe", "failedByMe", "droppedByMe", "wasClean",
    "wasNotCleanReason", "wasServerConnectionDropTimeout", "wasOpenHandshakeTimeout",
    "wasCloseHandshakeTimeout", "wasServingFlashSocketPolicyFile", "localCloseCode", "localCloseReason",
    "remoteCloseCode", "remoteCloseReason", "openHandshakeTimeoutCall", "closeHandshakeTimeoutCall",
    "autoPingTimeoutCall", "autoPingPending", "autoPingPendingCall", "autoPingPendingSeq",
    "autoPingPendingSent",
    # the opening handshake (let go once open: :meth:`TrimmedServerProtocol._onOpen`)
    "http_request_data", "http_status_line", "http_headers", "http_request_uri", "http_request_path",
    "http_request_params", "http_request_host", "websocket_version", "websocket_protocols",
    "websocket_origin", "websocket_extensions", "_wskey", "websocket_protocol_in_use",
    "websocket_extensions_in_use", "http_response_data",
    # frames and messages
    "inside_message", "current_frame", "current_frame_masker", "control_frame_data", "frame_data", "frame_length",
    "message_is_binary", "message_data", "message_data_total_length", "utf8validateIncomingCurrentMessage",
    "utf8validateLast", "_isMessageCompressed", "send_compressed", "send_message_opcode",
    "send_message_frame_length", "send_message_frame_mask", "send_message_frame_masker",
)

#: What an open connection no longer needs of its opening handshake (the request's head, parsed
#: and raw, and the response): some 2 kB a connection, let go once it is open.
_HANDSHAKE_STATE = ("http_request_data", "http_status_line", "http_headers", "http_request_uri",
                    "http_request_path", "http_request_params", "http_request_host", "websocket_protocols",
                    "websocket_origin", "websocket_extensions", "_wskey", "http_response_data")


def unmask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``mask`` repeated (RFC 6455 5.3): one integer XOR, where
    Autobahn makes a masker object per frame."""
    n = len(payload)
    key = mask * ((n >> 2) + 1)
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key[:n], "little")).to_bytes(n, "little")


class TrimmedServerProtocol(WebSocketServerProtocol):
    """Autobahn's server protocol, its per-message and per-connection paths trimmed.

    A message's fragments are gathered as they arrive. Autobahn keeps a list per frame and a
    list of their payloads per message: some 40 bytes a fragment whatever its size, so a 1 MiB
    message sent as 1-byte continuation frames held 53 MB (and a stream of empty ones grew
    without end, never reaching the size limit). Here a message is one buffer: its first
    fragment as it came (no copy for the usual single-frame message), a bytearray from the
    second on, so what a connection holds for a message is within its size limit.

    For a subclass: :meth:`holding` says when frames already read must wait, :meth:`wrote` hears
    of every write, :meth:`refusing` of every refused opening handshake, and :meth:`drop` closes
    without Autobahn's warning.
    """

    __slots__ = (*AUTOBAHN_STATE, "_is_closed", "_is_open", "_utf8validator", "_close_deadline")
    #: (name, value) of each slot a base class has a class attribute for: the slot starts with it,
    #: as the attribute read before it is set would have been (``transport``, ``peer``...).
    _slot_defaults: tuple = ()

    def __init__(self) -> None:
        """Autobahn's (``WebSocketProtocol.__init__``), less what each idle connection held and
        none uses: its futures are made when first asked for (:attr:`is_open`, :attr:`is_closed`),
        its list of events is shared and the dict of their results made at the first listener
        (:meth:`on`), its transport details are made as the connection is (``connectionMade``)."""
        for name, value in self._slot_defaults:
            setattr(self, name, value)
        self._is_closed: Deferred | None = None
        self._is_open: Any = None  # a Deferred once asked for, or where the opening is (_OPENING, _OPENED)
        self._valid_events = _EVENTS
        self._results = None
        self._transport_details: TransportDetails | None = None
        self._utf8validator: Utf8Validator | None = None  # made at the first text message (utf8validator)
        self._close_deadline: IDelayedCall | None = None  # aborts a peer which does not finish closing

    @property
    def is_closed(self) -> Deferred:
        """Fires (with the protocol) once the connection is closed, as Autobahn's; made when
        first asked for (Autobahn asks as the connection closes)."""
        if self._is_closed is None:
            self._is_closed = Deferred()
        return self._is_closed

    @is_closed.setter
    def is_closed(self, value: Deferred) -> None:
        self._is_closed = value

    @property
    def is_open(self) -> Deferred:
        """Fires once the connection is open, as Autobahn's; made when first asked for. Asked
        for after that, it is a Deferred that has fired already (each its own). Autobahn fires
        it just after :meth:`onOpen`: then (:data:`_OPENING`) it is given a Deferred of its own
        to fire, and nothing is kept."""
        opened = self._is_open
        if opened is None:
            opened = self._is_open = Deferred()
        elif opened is _OPENING:
            self._is_open = _OPENED
            return Deferred()
        elif opened is _OPENED:
            return succeed(None)
        return opened

    @is_open.setter
    def is_open(self, value: Deferred) -> None:
        self._is_open = value

    @property
    def utf8validator(self) -> Utf8Validator:
        """Autobahn's incremental UTF-8 validator of text messages: made at the first one (it
        is 200 bytes, and a C object, that an idle connection does not need)."""
        if self._utf8validator is None:
            self._utf8validator = Utf8Validator()
        return self._utf8validator

    @utf8validator.setter
    def utf8validator(self, value: Utf8Validator) -> None:
        pass  # Autobahn makes one as each connection is made: the first text message does instead

    def on(self, event: str, handler: Callable[..., object]) -> None:
        """Autobahn's, the dict of the events' results made with the first listener."""
        if self._results is None:
            self._results = dict.fromkeys(self._valid_events)
        super().on(event, handler)

    def holding(self) -> bool:
        """Whether the frames a read already brought must wait (processed once it is False and
        :meth:`consumeData` is called again); never, here."""
        return False

    def wrote(self, size: int) -> None:
        """``size`` bytes were written to the transport (after the write)."""

    def connectionMade(self) -> None:
        # Autobahn's create_transport_details, less what circles never reads and each connection
        # held: the process and thread ids, an empty channel-id dict, a TLS peer certificate.
        secure = ISSLTransport.providedBy(self.transport)
        self.peer = peer2str(self.transport)
        self._transport_details = TransportDetails(
            channel_type=TransportDetails.CHANNEL_TYPE_TLS if secure else TransportDetails.CHANNEL_TYPE_TCP,
            channel_framing=TransportDetails.CHANNEL_FRAMING_WEBSOCKET, peer=self.peer, is_server=self.is_server,
            is_secure=secure)
        try:
            self.transport.setTcpNoDelay(self.tcpNoDelay)
        except Exception:  # not a TCP transport (a unix socket, a test's)
            pass
        self._connectionMade()

    def _connectionMade(self) -> None:
        WebSocketProtocol._connectionMade(self)
        self.send_queue = ()  # Autobahn's queue for chopped and synchronous sends: made once one is asked for
        # Autobahn's traffic counters, which it only adds to (circles reads none): the factory's.
        self.trafficStats = self.factory.traffic
        self.factory.countConnections += 1

    def _onOpen(self) -> None:
        """Autobahn's, without the TLS channel binding (``tls-unique``) and peer certificate it
        reads into the transport details for WAMP: circles reads neither. Once the subclass's
        :meth:`onOpen` has run, what the opening handshake left is let go."""
        try:
            self.onOpen()
        finally:
            if self._is_open is None:
                self._is_open = _OPENING  # Autobahn fires it next: see is_open
            for name in _HANDSHAKE_STATE:
                setattr(self, name, None)
            if not self.websocket_extensions_in_use:  # none (permessage-deflate is never accepted here)
                self.websocket_extensions_in_use = ()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._close_deadline is not None:
            if self._close_deadline.active():
                self._close_deadline.cancel()
            self._close_deadline = None
        if _is_tls_error(reason.value):
            self.log.error(_maybe_tls_reason(reason.value))
        self._connectionLost(reason)
        # What the connection read and has not used yet goes now, not when the protocol does:
        # Autobahn resolves ``is_closed`` with the protocol itself, a reference cycle that keeps
        # it until the garbage collector's next full pass, which bytes (not tracked by it) do not
        # hasten. A half-sent message held that way outlived its connection by minutes.
        self.message_data = self.frame_data = None
        self.data = b""

    def _connectionLost(self, reason) -> None:
        WebSocketProtocol._connectionLost(self, reason)
        self.factory.countConnections -= 1

    def dataReceived(self, data: bytes) -> None:
        self._dataReceived(data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue or self.logOctets:
            if not self.send_queue:
                self.send_queue = deque()
            super().sendData(data, sync, chopsize)  # never asked for here: Autobahn's send queue
            return
        self.transport.write(data)
        self.wrote(len(data))  # after the write: one that fills the buffer pauses us, and counts
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

    def processData(self) -> bool:
        """Autobahn's, with a short way for the usual frame: a whole masked text message in one
        frame of under 64 KiB, all in the buffer, on an open connection. Autobahn parses every
        frame's header with a dozen checks, makes a masker object and a frame header object for
        it, validates its UTF-8 incrementally and calls six methods of its own on the way to
        :meth:`onMessage`: half the CPU a small request costs the server (docs/benchmarks.md, "The
        RPC path"). Here such a frame is unmasked with one integer XOR, its UTF-8 checked by
        Python's strict decoder (which refuses what RFC 6455 refuses: overlong forms,
        surrogates, code points past U+10FFFF), and the size limits and the subclass's hooks
        (:meth:`onMessageBegin`, :meth:`onMessageFrameBegin`) are asked as before. Any other
        frame (control frames, fragments, a reserved bit, a frame not all there yet, invalid
        UTF-8, one over a limit, an unmasked one) goes Autobahn's way, which refuses and closes
        as it always did."""
        data = self.data
        if (self.current_frame is None and len(data) >= 6 and data[0] == 0x81 and data[1] & 0x80
                and not self.inside_message and self.state == self.STATE_OPEN
                and not self.logFrames and not self.trackedTimings):
            length = data[1] & 0x7F
            head = 6
            if length == 126:
                length = int.from_bytes(data[2:4], "big")
                head = 8
                if length < 126:  # not the minimal encoding: Autobahn's protocol violation
                    return super().processData()
            elif length == 127:
                return super().processData()
            end = head + length
            if len(data) >= end and not (0 < self.maxFramePayloadSize < length) \
                    and not (0 < self.maxMessagePayloadSize < length):
                payload = data[head:end]
                if length and self.applyMask:
                    payload = unmask(payload, data[head - 4:head])
                if self.utf8validateIncoming:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:  # Autobahn's validator says where, and fails with 1007
                        return super().processData()
                self.data = data[end:]
                stats = self.trafficStats
                stats.incomingOctetsWebSocketLevel += length
                stats.incomingOctetsAppLevel += length
                stats.incomingWebSocketFrames += 1
                stats.incomingWebSocketMessages += 1
                if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                    self._cancelAutoPingTimeoutCall()
                self.inside_message = True
                self.onMessageBegin(False)
                self.onMessageFrameBegin(length)  # the size limits, the subclass's count of fragments
                self.inside_message = False
                if not self.failedByMe:
                    self.message_data = None
                    self._onMessage(payload, False)
                return len(self.data) > 0
        return super().processData()

    def sendMessage(self, payload: bytes, isBinary: bool = False, fragmentSize: int | None = None,
                    sync: bool = False, doNotCompress: bool = False) -> None:
        """Autobahn's, with a short way for the usual reply: an unfragmented text message, no
        compression, no masking (a server's frames are not masked), on an open connection: its
        header made at once rather than by ``sendFrame``'s general case. The traffic counters and
        the size limit are kept; anything else goes Autobahn's way."""
        length = len(payload)
        if (isBinary or fragmentSize is not None or sync or self.state != self.STATE_OPEN
                or self._perMessageCompress is not None or self.trackedTimings or self.logFrames
                or self.autoFragmentSize or self.maskServerFrames or 0 < self.maxMessagePayloadSize < length):
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)
            return
        stats = self.trafficStats
        stats.outgoingWebSocketMessages += 1
        stats.outgoingOctetsAppLevel += length
        stats.outgoingOctetsWebSocketLevel += length
        stats.outgoingWebSocketFrames += 1
        if length < 126:
            frame = bytes((0x81, length)) + payload
        elif length < 0x10000:
            frame = b"\x81\x7e" + length.to_bytes(2, "big") + payload
        else:
            frame = b"\x81\x7f" + length.to_bytes(8, "big") + payload
        self.sendData(frame)

    def onMessageBegin(self, isBinary: bool) -> None:
        self.message_is_binary = isBinary
        self.message_data = b""
        self.message_data_total_length = 0

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)  # Autobahn's size limits (payload and frame)
        self.frame_data = None  # which it starts a list for: nothing is kept per frame here

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.failedByMe:
            return
        held = self.message_data
        if not held:
            self.message_data = payload
        elif type(held) is bytes:
            gathered = bytearray(held)
            gathered += payload
            self.message_data = gathered
        else:
            held += payload

    def onMessageFrameEnd(self) -> None:
        pass  # the frame's data is in the message already

    def consumeData(self) -> None:
        """Autobahn's, except that while :meth:`holding` the frames a read already brought wait
        too (a subclass holds them while the peer does not read what is sent)."""
        if self.state == self.STATE_OPEN or self.state == self.STATE_CLOSING:
            while not self.holding() and self.processData() and self.state != self.STATE_CLOSED:
                pass
        else:
            super().consumeData()

    def onMessageEnd(self) -> None:
        payload, self.message_data = self.message_data, None
        if not self.failedByMe:
            self._onMessage(payload if type(payload) is bytes else bytes(payload), self.message_is_binary)

    def refusing(self, reason: str, code: int, responseHeaders) -> tuple:
        """An opening handshake is refused with ``code`` for ``reason``: ``(reason, headers,
        detail)`` to answer with (:meth:`sendHttpErrorResponse`). As given, here."""
        return reason, responseHeaders, None

    def failHandshake(self, reason: str, code: int = 400, responseHeaders=None) -> None:
        """Autobahn's, without its two lines per refusal (an info line, then a warning as the
        connection drops): :meth:`refusing` is told instead, and says what to answer."""
        self.wasNotCleanReason = reason
        answer, responseHeaders, detail = self.refusing(reason, code, responseHeaders)
        self.sendHttpErrorResponse(code, answer, responseHeaders, detail)
        self.drop(abort=False)

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders=None,
                              detail: str | None = None) -> None:
        """Autobahn's, with a body: ``{"error": detail or reason}``, as the HTTP routes' errors
        answer (Autobahn sends the status line and headers alone: a browser or curl showed nothing)."""
        body = json.dumps({"error": detail or reason}, separators=(",", ":")).encode("utf-8")
        headers = [*(responseHeaders or ()), ("Content-Type", "application/json"),
                   ("Content-Length", str(len(body))), ("Connection", "close")]
        super().sendHttpErrorResponse(code, reason, headers)
        self.sendData(body)

    def drop(self, abort: bool) -> None:
        """Autobahn's ``dropConnection``, without its warning (a line per connection, at a client's will)."""
        self.unregisterProducer()
        if self.state != self.STATE_CLOSED:
            self.droppedByMe = True
            self.state = self.STATE_CLOSED
            txaio.resolve(self.is_closed, self)
            self._closeConnection(abort)

    def unread_grace(self) -> float:
        """Seconds a peer gets to read what is still queued for it when the connection closes
        (then it is aborted; 0: no bound). :data:`CLOSE_GRACE`, here."""
        return CLOSE_GRACE

    def _closeConnection(self, abort: bool = False) -> None:
        # Autobahn aborts right after queuing its close frame (a protocol error's 1002, a ping
        # timeout). Over TLS, Twisted holds small writes until the end of the reactor turn and
        # an abort throws them away, so the peer never learned why: close in order there (what
        # is queued, then close_notify). Plain TCP sends at once (circles.server.http.eager):
        # aborting loses nothing. Autobahn aborts after a clean closing handshake too (the peer
        # answered our close): a reset a load balancer counts as a server error (HAProxy's "SD",
        # eresp) on every connection a drain closes. The peer has read all: close in order.
        # Closing in order, nothing more is written: the FIN goes at once (close_at_once; over
        # TLS right after close_notify), so that the server ends the connection first (RFC 6455 7.1.1).
        secure = self._transport_details is not None and self._transport_details.is_secure
        if abort and not (secure or self.wasClean):
            super()._closeConnection(abort)
            return
        # A close that waits on the peer (for its close_notify, or to read what is queued) is
        # bounded: an aborting one by CLOSE_GRACE (Autobahn's abort was at once), the others as
        # an open connection's unread replies are (unread_grace).
        self._close_deadline = close_in_order(self.transport, self.factory.clock.callLater,
                                              CLOSE_GRACE if abort else self.unread_grace())


#: The events Autobahn's protocol may fire (its ``set_valid_events``): the same for every connection.
_EVENTS = ("message",)
#: Where a connection that nobody asked ``is_open`` of is: opening (Autobahn is about to fire
#: it), and opened.
_OPENING: Any = object()
_OPENED: Any = object()


def _class_defaults(cls: type, names: tuple) -> tuple:
    """(name, value) of each of ``names`` that a class above ``cls`` has a plain attribute for."""
    found = []
    for name in names:
        for base in cls.__mro__[1:]:
            if name in vars(base):
                value = vars(base)[name]
                assert not hasattr(value, "__get__"), f"{base.__name__}.{name} is a descriptor, not a default"
                found.append((name, value))
                break
    return tuple(found)


TrimmedServerProtocol._slot_defaults = _class_defaults(TrimmedServerProtocol, TrimmedServerProtocol.__slots__)


class _Timer:
    """One of Autobahn's timers, in its delay's lane of :class:`_Timers`: cancelling one that has
    fired, or was cancelled, is a no-op (as Autobahn expects of txaio's)."""

    __slots__ = ("_lanes", "_delay", "_func", "_args")

    def __init__(self, lanes: TimerLanes, delay: float, func: Callable[..., object], args: tuple) -> None:
        self._lanes = lanes
        self._delay = delay
        self._func = func
        self._args = args

    def cancel(self) -> None:
        self._lanes.cancel(self._delay, self)

    def _run(self) -> None:
        self._func(*self._args)


class _Timers:
    """The timers of a factory's connections (Autobahn's: ping, pong, opening and closing
    handshakes; and any other of a constant delay), on the factory's clock, each at its own
    deadline: a :class:`TimerLane` per delay, so an idle connection's timers cost an entry each
    in their lane rather than a call of the clock each.

    Autobahn's own (txaio's batched timer) truncates every deadline to the whole second, so a
    pong timeout fired up to a second early (``--ping-timeout 0.5`` could drop a peer at once),
    and it runs on txaio's global loop, not the injected clock."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._lanes = TimerLanes(clock, _Timer._run)

    def call_later(self, delay: float, func: Callable[..., object], *args, **kwargs) -> _Timer:
        timer = _Timer(self._lanes, delay, partial(func, **kwargs) if kwargs else func, args)
        self._lanes.set(delay, timer)
        return timer

    def lane(self, delay: float, fire: Callable[[Any], object]) -> TimerLane:
        """A lane of its own for timers of ``delay`` seconds, each key fired with ``fire(key)``."""
        return TimerLane(self._clock, delay, fire)


class TrimmedServerFactory(WebSocketServerFactory):
    """Autobahn's server factory for :class:`TrimmedServerProtocol`\\ s, its timers exact and on
    ``clock``."""

    protocol = TrimmedServerProtocol

    def __init__(self, clock: IReactorTime, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        #: The connections' timers, exact and on ``clock``: Autobahn's (its ``_batched_timer``), and lanes of others.
        self.timers = self._batched_timer = _Timers(clock)
        #: Autobahn's traffic counters of every connection, together (circles reads none).
        self.traffic = TrafficStats()

    def fix_protocol_options(self, **extra) -> None:
        """Set the protocol options (those of ``setProtocolOptions``, and ``extra``) once, on a
        protocol class of this factory's own: they must not change afterwards.

        Autobahn copies every option from the factory onto each new protocol and pretty-prints
        them all for a debug line, eagerly, whatever the log level: a fifth of a handshake's
        CPU. Set once, nothing is left to copy or print per connection."""
        options = {attr: getattr(self, attr) for attr in self.protocol.CONFIG_ATTRS}
        options = {attr: staticmethod(value) if callable(value) else value for attr, value in options.items()}
        self.protocol = type(self.protocol.__name__, (self.protocol,), {**options, **extra, "CONFIG_ATTRS": ()})
