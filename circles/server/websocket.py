"""Autobahn's WebSocket server, trimmed: where circles leans on Autobahn's internals, here only.

Autobahn's per-message and per-connection paths build debug-log arguments eagerly (qualified
names, peer strings, a connection-lost reason's whole traceback), whatever the log level, and
fire a "message" event through txaio futures for observers never registered here: a quarter of
the CPU a small message costs and a tenth of a handshake's. :class:`TrimmedServerProtocol`
overrides those paths, each keeping everything else the original does;
:class:`TrimmedServerFactory` gives Autobahn's timers exact deadlines on an injected clock and
sets the protocol options once per factory instead of once per connection.
:class:`circles.protocol.CircleProtocol` builds on them.

Autobahn internals relied on (pyproject.toml pins Autobahn's line, and ``tests/test_protocol.py``
holds the digests of the Autobahn source each override was written against: an Autobahn that
changes any of it fails there first):

- the private steps of a connection's life that the overrides call: ``_connectionMade``,
  ``_connectionLost``, ``_dataReceived``, ``_onMessage``, and ``_closeConnection``, overridden;
- ``_transport_details``, the transport's details that ``connectionMade`` sets;
- ``autobahn.util._is_tls_error`` and ``_maybe_tls_reason``, as Autobahn's ``connectionLost`` uses them;
- the factory's ``_batched_timer``, whose ``call_later`` makes every timer of a connection
  (ping, pong, opening and closing handshakes);
- ``CONFIG_ATTRS``, the options Autobahn copies from the factory onto each new protocol;
- the attributes a message is gathered in (``message_data``, ``frame_data``, ``data``).
"""

from __future__ import annotations

import json

import txaio
from autobahn.twisted.util import create_transport_details
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import _is_tls_error, _maybe_tls_reason
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

#: Seconds a TLS peer gets to finish an aborting close in order (see ``_closeConnection``).
TLS_ABORT_GRACE = 2.0


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

    _tls_abort = None  # the timer that aborts a TLS peer which does not finish closing

    def holding(self) -> bool:
        """Whether the frames a read already brought must wait (processed once it is False and
        :meth:`consumeData` is called again); never, here."""
        return False

    def wrote(self, size: int) -> None:
        """``size`` bytes were written to the transport (after the write)."""

    def connectionMade(self) -> None:
        self._transport_details = create_transport_details(self.transport, self.is_server)
        self._transport_details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
        self.peer = self._transport_details.peer
        try:
            self.transport.setTcpNoDelay(self.tcpNoDelay)
        except Exception:  # not a TCP transport (a unix socket, a test's)
            pass
        self._connectionMade()

    def _connectionMade(self) -> None:
        WebSocketProtocol._connectionMade(self)
        self.factory.countConnections += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._tls_abort is not None:
            if self._tls_abort.active():
                self._tls_abort.cancel()
            self._tls_abort = None
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
            super().sendData(data, sync, chopsize)  # never asked for here: Autobahn's send queue
            return
        self.transport.write(data)
        self.wrote(len(data))  # after the write: one that fills the buffer pauses us, and counts
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)

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

    def _closeConnection(self, abort: bool = False) -> None:
        # Autobahn aborts right after queuing its close frame (a protocol error's 1002, a ping
        # timeout). Over TLS, Twisted holds small writes until the end of the reactor turn and
        # an abort throws them away, so the peer never learned why. Close in order there (what
        # is queued, then close_notify), and abort only a peer that has not finished within
        # TLS_ABORT_GRACE. Plain TCP sends at once (circles.server.http.eager): aborting loses nothing.
        # Autobahn aborts after a clean closing handshake too (the peer answered our close): a
        # reset a load balancer counts as a server error (HAProxy's "SD", eresp) on every
        # connection a drain closes. The peer has read all: close in order, bounded the same way.
        secure = self._transport_details is not None and self._transport_details.is_secure
        if abort and (secure or self.wasClean):
            self.transport.loseConnection()
            self._tls_abort = self.factory.clock.callLater(TLS_ABORT_GRACE, self.transport.abortConnection)
        else:
            super()._closeConnection(abort)


class _Timer:
    """One of :class:`_Timers`' calls: cancelling one that has fired, or was cancelled, is a no-op
    (as Autobahn expects of txaio's)."""

    __slots__ = ("_call",)

    def __init__(self, call: IDelayedCall) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class _Timers:
    """Autobahn's timers of a connection (ping, pong, opening and closing handshakes) on the
    factory's clock, each at its own deadline. Autobahn's own (txaio's batched timer) truncates
    every deadline to the whole second, so a pong timeout fired up to a second early (``--ping-timeout
    0.5`` could drop a peer at once), and it runs on txaio's global loop, not the injected clock."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def call_later(self, delay: float, func, *args, **kwargs) -> _Timer:
        return _Timer(self._clock.callLater(delay, func, *args, **kwargs))


class TrimmedServerFactory(WebSocketServerFactory):
    """Autobahn's server factory for :class:`TrimmedServerProtocol`\\ s, its timers exact and on
    ``clock``."""

    protocol = TrimmedServerProtocol

    def __init__(self, clock: IReactorTime, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock
        self._batched_timer = _Timers(clock)  # Autobahn's timers, exact and on the injected clock

    def fix_protocol_options(self, **extra) -> None:
        """Set the protocol options (those of ``setProtocolOptions``, and ``extra``) once, on a
        protocol class of this factory's own: they must not change afterwards.

        Autobahn copies every option from the factory onto each new protocol and pretty-prints
        them all for a debug line, eagerly, whatever the log level: a fifth of a handshake's
        CPU. Set once, nothing is left to copy or print per connection."""
        options = {attr: getattr(self, attr) for attr in self.protocol.CONFIG_ATTRS}
        options = {attr: staticmethod(value) if callable(value) else value for attr, value in options.items()}
        self.protocol = type(self.protocol.__name__, (self.protocol,), {**options, **extra, "CONFIG_ATTRS": ()})
