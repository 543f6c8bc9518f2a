"""Bounds on HTTP requests, enforced while they arrive: the time a whole request may take and
the form of its head (:class:`RequestDeadlineChannel`), and the size of its body
(:class:`BoundedRequest`).

Twisted's ``Request`` stores the whole body (in memory, or a temporary file past 100 kB)
before any resource sees the request, so a limit checked in a handler comes too late: the bytes
are already taken. :class:`BoundedRequest` refuses at the channel level instead: a declared
``Content-Length`` over the limit is answered 413 as soon as the headers are in (no
``100 Continue``, nothing read); a chunked body is counted as it arrives and refused the moment
it passes the limit, or its :data:`MAX_CHUNKS` chunks. Nothing beyond the limit is ever stored.

After the 413 the connection stops parsing and discards what still comes; over TCP it
half-closes at once (the client reads the whole answer and an end of file, instead of a reset
caused by unread data), over TLS it sends close_notify. It is dropped after :data:`LINGER`
seconds whatever the client does.

The limit applies to every route of the Site: the webhooks are the only ones taking a body.

Twisted internals relied on, here only (pyproject.toml pins Twisted's line, and
``tests/integration/test_dependencies.py`` holds digests of the Twisted code reviewed: a Twisted that changes
any of it fails there first). Twisted offers no public way to do any of this:

- :class:`RequestDeadlineChannel` reads ``HTTPChannel``'s ``_handlingRequest`` (a request is being
  answered), ``_waitingForTransport`` (the transport paused us), ``_dataBuffer`` (pipelined bytes
  read meanwhile, which it takes over) and ``_networkProducer`` (what it pauses), and
  ``LineReceiver``'s ``_buffer``, ``_busyReceiving`` and ``line_mode`` (a head still being read);
  it replaces ``HTTPChannel.loseConnection`` (``_networkProducer`` off, then the close, here in
  order and with a deadline: :func:`circles.common.eager.close_in_order`), and
  ``_respondToBadRequestAndDisconnect`` (the 400 with a reason).
- :class:`BoundedRequest` stops the parsing of its channel by replacing the channel's
  ``dataReceived`` and ``rawDataReceived`` on the instance: ``LineReceiver`` calls both through
  ``self``; and it relies on ``HTTPChannel`` asking ``gotLength`` before it looks at
  ``Expect: 100-continue``, once its ``_transferDecoder`` is chosen: a
  ``_ChunkedTransferDecoder`` is replaced there by :class:`CountedChunks`, which counts the
  chunk-size lines that decoder reads (``_dataReceived_CHUNK_LENGTH``) and empties its
  ``_buffer`` to stop its loop.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _ChunkedTransferDecoder
from twisted.web.server import Request

from circles.common.eager import CLOSE_GRACE, close_in_order
from circles.common.log_budget import LogBudget
from circles.server.access.limits import half_close
from circles.server.config import DEFAULT_MAX_REQUEST_BODY
from circles.server.http.responses import refusal

LINGER = 5.0  # seconds a refused connection may keep sending before it is dropped

#: The most chunks a chunked request body may come in. Twisted's decoder spends some 3 us on
#: each, however small: 1 MiB in 1-byte chunks (6 MB sent) took 3 s of the reactor's CPU, where
#: 1 MiB as one body takes 2 ms. The same bound as a WebSocket message's frames (--max-fragments).
MAX_CHUNKS = 4096

_TOO_LARGE = refusal(b"413 Content Too Large", b"request body too large")
_TOO_MANY_CHUNKS = refusal(b"413 Content Too Large", b"request body in too many chunks (at most %d)" % MAX_CHUNKS)
BARE_LF_ANSWER = refusal(b"400 Bad Request",
                         b"a line of the request head ends in a bare LF: HTTP/1.1 lines end in CRLF")
MALFORMED_ANSWER = refusal(b"400 Bad Request",
                           b"malformed HTTP/1.1 request (RFC 9112): its request line, a header or its chunked body")


class BoundedRequest(Request):
    """A ``Request`` refusing bodies over ``max_body`` bytes (see :func:`bounded_request_factory`),
    whose answers name the server ``circles``."""

    max_body: int = DEFAULT_MAX_REQUEST_BODY
    log_budget: LogBudget  # where refusals are logged: anyone can make them (bounded_request_factory sets it)
    _refused = False
    _received = 0

    def gotLength(self, length) -> None:
        if length is not None and length > self.max_body:
            self.content = BytesIO()
            # Never invite the body we are about to refuse (the channel checks after this call).
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()
            return
        channel: Any = self.channel
        decoder = channel._transferDecoder
        if type(decoder) is _ChunkedTransferDecoder:
            channel._transferDecoder = CountedChunks(decoder.dataCallback, decoder.finishCallback,
                                                     self._too_many_chunks)
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def setHeader(self, name, value) -> None:
        # Twisted names itself and its version in every answer (``TwistedWeb/26.10.0``, set in
        # ``process``): a scanner's first question answered. The upgrade's 101 says "circles".
        super().setHeader(name, b"circles" if name == b"Server" else value)

    def requestReceived(self, command, path, version) -> None:
        if self._refused:
            return  # answered already; the rest of the body arrived in the same read
        super().requestReceived(command, path, version)

    def _too_many_chunks(self) -> None:
        if not self._refused:
            self._refuse(_TOO_MANY_CHUNKS, "refused a request body in over {limit} chunks from {peer}", MAX_CHUNKS)

    def _refuse(self, answer: bytes = _TOO_LARGE,
                why: str = "refused a request body over {limit} bytes from {peer}", limit: int | None = None) -> None:
        self._refused = True
        channel = self.channel
        transport: Any = channel.transport  # the request is being read from it: connected
        self.log_budget.note(getattr(transport.getPeer(), "host", "?"), "413", why,
                             limit=self.max_body if limit is None else limit)
        # Stop parsing: anything more the client sends is dropped unread.
        channel.rawDataReceived = channel.dataReceived = lambda data: None  # type: ignore[method-assign]
        transport.write(answer)
        if not half_close(transport):
            transport.loseConnection()  # over TLS: the answer, then close_notify
        timer = channel.callLater(LINGER, transport.abortConnection)
        self.notifyFinish().addBoth(lambda _: timer.active() and timer.cancel())


class CountedChunks(_ChunkedTransferDecoder):
    """Twisted's decoder of a chunked body, which at the chunk past :data:`MAX_CHUNKS` drops
    what it holds, stops, and calls ``refuse`` instead of reading on."""

    def __init__(self, dataCallback, finishCallback, refuse) -> None:
        super().__init__(dataCallback, finishCallback)
        self._refuse = refuse
        self._chunks = 0

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        if self.state != "BODY":  # the last chunk, of length 0: the end, not a chunk of the body
            return True
        self._chunks += 1
        if self._chunks > MAX_CHUNKS:
            del self._buffer[:]  # the decoder loops while its buffer holds bytes
            self._refuse()
            return False
        return True


def bounded_request_factory(max_body: int, log_budget: LogBudget) -> type:
    """A :class:`BoundedRequest` class with the given limit, its refusals logged within
    ``log_budget``, for ``Site.requestFactory``."""
    return type("BoundedRequest", (BoundedRequest,), {"max_body": max_body, "log_budget": log_budget})


class RequestDeadlineChannel(HTTPChannel):
    """An HTTP channel that must receive each whole request within its ``timeOut``.

    Twisted's own timeout is one of silence: every byte restarts it, so a client sending a
    header byte a second would hold its connection for hours. Here the first request (the
    WebSocket upgrade, usually) must arrive whole within ``timeOut`` of the connection, and each
    later one within ``timeOut`` of the previous answer; the idle timeout still applies too.

    Pipelined requests wait while the client does not read: when the transport's buffer is full
    (it pauses us), the next request is parsed only once it drains. Twisted's channel went on
    to answer every request already read, each answer buffered: a client pipelining cheap
    requests for a large answer and reading nothing grew the server by the answers' size (over
    TLS, 6 GB of RSS from 20 MB of ``GET /openrpc.json``).

    A request head whose lines end in a bare LF is answered 400 as soon as the LF arrives.
    Twisted splits the head on CRLF only, so such a head (``GET / HTTP/1.1\\nHost: x\\n\\n``)
    was one unfinished line, unanswered until the deadline. RFC 9112 (2.2) lets a server accept
    a bare LF as a line end or refuse it; refused, a proxy in front that reads the lines
    otherwise cannot be made to see other requests, or other headers, than we do.
    """

    _deadline = None
    _closing = None  # the deadline of a close that waits on the client (close_in_order)
    _timed_out = False
    _held: bytes | None = None  # pipelined bytes waiting for the transport to drain
    #: Seconds a timed-out client gets to answer our TLS close_notify before the connection is
    #: aborted (Twisted's default, 15, let a silent TLS client hold its descriptor that long).
    abortTimeout = 2

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        if self.timeOut and self._deadline is None:
            self._deadline = self.callLater(self.timeOut, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def allContentReceived(self) -> None:
        self._disarm()
        super().allContentReceived()

    def dataReceived(self, data: bytes) -> None:
        if self._held is not None:
            self._held += data  # read before the pause took effect (TLS decrypts in batches)
            return
        super().dataReceived(data)
        # Still reading a head, and an LF in it that ended no line (the parser waits for CRLF).
        # Not while the parser is busy (a request answered at once replays pipelined bytes into
        # it from inside its own loop): its buffer holds whole lines then, checked as they go.
        if self.line_mode and not self._busyReceiving and b"\n" in self._buffer:
            self._refuse_bare_lf()

    def lineReceived(self, line: bytes) -> None:
        if b"\n" in line:  # a line of the head with a bare LF inside
            self._refuse_bare_lf()
            return
        super().lineReceived(line)

    def _refuse_bare_lf(self) -> None:
        if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]  # a FileDescriptor's
            return
        self._buffer = b""
        self.transport.write(BARE_LF_ANSWER)
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's answered the status alone. Its callers: a request line or header that breaks
        # RFC 9112, over maxHeaders headers, a bad or second Content-Length, a Transfer-Encoding
        # other than chunked, a malformed chunked body.
        if self.transport is not None:
            self.transport.write(MALFORMED_ANSWER)
        self.loseConnection()

    def requestDone(self, request) -> None:
        if self.persistent and self._waitingForTransport and self._held is None:
            # Keep what follows from the parser (Twisted would parse it now) and stop reading.
            self._held, self._dataBuffer = b"".join(self._dataBuffer), []
            self._networkProducer.pauseProducing()
        super().requestDone(request)
        if self.persistent and self.transport is not None:
            self._arm()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self._held is not None and not self._handlingRequest:
            held, self._held = self._held, None
            if held:
                self.dataReceived(held)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is not None:  # None: handed over to a WebSocket
            self.timeoutConnection()

    def timeoutConnection(self) -> None:
        # Twisted's silence timeout and this deadline can both fire. Each would log and arm a
        # forced abort, and the first abort's timer, forgotten, would fire after the connection
        # was gone: over TLS, an AttributeError from the closed TLS transport.
        if not self._timed_out:
            self._timed_out = True
            super().timeoutConnection()

    def loseConnection(self) -> None:
        # Twisted's (the producer off, then the transport's close), in order and bounded: after
        # an answer with "Connection: close" no deadline of the channel runs, and over TLS the
        # close waited for the client's close_notify: a client that never sent it held its
        # connection for ever. The FIN goes at once too (over TLS the server then keeps the
        # TIME_WAIT; over plain TCP curl has mostly closed already, as soon as the body was whole).
        self._networkProducer.unregisterProducer()  # type: ignore[attr-defined]  # the transport, as IProducer
        if self._closing is None and self.transport is not None:
            self._closing = close_in_order(self.transport, self.callLater, self.timeOut or CLOSE_GRACE)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        if self._closing is not None:
            if self._closing.active():
                self._closing.cancel()
            self._closing = None
        super().connectionLost(reason)
