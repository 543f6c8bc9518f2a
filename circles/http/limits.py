"""A bound on HTTP request bodies, enforced while the body arrives.

Twisted's ``Request`` stores the whole body (in memory, or a temporary file past 100 kB)
before any resource sees the request, so a limit checked in a handler comes too late: the bytes
are already taken. :class:`BoundedRequest` refuses at the channel level instead: a declared
``Content-Length`` over the limit is answered 413 as soon as the headers are in (no
``100 Continue``, nothing read); a chunked body is counted as it arrives and refused the moment
it passes the limit. Nothing beyond the limit is ever stored.

After the 413 the connection stops parsing and discards what still comes; over TCP it
half-closes at once (the client reads the whole answer and an end of file, instead of a reset
caused by unread data), over TLS it sends close_notify. It is dropped after :data:`LINGER`
seconds whatever the client does.

The limit applies to every route of the Site: the webhooks are the only ones taking a body.
"""

from __future__ import annotations

from io import BytesIO

from twisted.web.server import Request

from circles.anomalies import LogBudget
from circles.limits import half_close

DEFAULT_MAX_REQUEST_BODY = 1024 * 1024
LINGER = 5.0  # seconds a refused connection may keep sending before it is dropped

_TOO_LARGE = b'{"error":"request body too large"}'


class BoundedRequest(Request):
    """A ``Request`` refusing bodies over ``max_body`` bytes; see :func:`bounded_request_factory`."""

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
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version) -> None:
        if self._refused:
            return  # answered already; the rest of the body arrived in the same read
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        channel = self.channel
        transport = channel.transport
        self.log_budget.note(getattr(transport.getPeer(), "host", "?"), "413",
                             "refused a request body over {limit} bytes from {peer}", limit=self.max_body)
        # Stop parsing: anything more the client sends is dropped unread.
        channel.rawDataReceived = channel.dataReceived = lambda data: None
        transport.write(b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE))
        if not half_close(transport):
            transport.loseConnection()  # over TLS: the answer, then close_notify
        timer = channel.callLater(LINGER, transport.abortConnection)
        self.notifyFinish().addBoth(lambda _: timer.active() and timer.cancel())


def bounded_request_factory(max_body: int, log_budget: LogBudget) -> type:
    """A :class:`BoundedRequest` class with the given limit, its refusals logged within
    ``log_budget``, for ``Site.requestFactory``."""
    return type("BoundedRequest", (BoundedRequest,), {"max_body": max_body, "log_budget": log_budget})
