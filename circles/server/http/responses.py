"""JSON answers of the HTTP routes (``/auth/...``, ``/webhooks/...``, ``/health``, ``/ready``).

One place sets the status, the content type and the caching policy of a JSON body, so every
route answers the same way. Bodies are compact, save ``/auth``'s, which are spaced
(``json.dumps``' default): those routes serve the ecosystem's earlier clients and answer as they
always have, as the README shows them. ``/ready``'s 503 was spaced too, by no one's choice (its
first version used ``json.dumps``' default and the bytes were kept since); it is compact like
``/health`` and ``/ready``'s 200 now.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

_COMPACT = (",", ":")


def json_response(request: IRequest, status: int, body: Any, *, compact: bool = True, no_store: bool = True) -> bytes:
    """Set ``status`` and ``content-type: application/json`` on ``request`` and return ``body``
    encoded, the body to write, whole. ``no_store`` adds ``cache-control: no-store``: the answer is
    about this moment (a nonce, a delivery's fate), and no cache may hand it to anyone else. Its
    ``content-length`` is set too: without it Twisted chunks the body (Klein's routes), three
    sends where two do."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    if no_store:
        request.setHeader(b"cache-control", b"no-store")
    encoded = json.dumps(body, separators=_COMPACT if compact else None).encode("utf-8")
    request.setHeader(b"content-length", b"%d" % len(encoded))
    return encoded


def refusal(status: bytes, error: bytes) -> bytes:
    """A whole answer, head and JSON body ``{"error": error}``, that closes the connection: for
    refusals written straight to the transport, before or outside a ``Request`` (a head too
    large, a body refused as it arrives, a malformed request). ``error`` holds no quote."""
    body = b'{"error":"%s"}' % error
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, len(body), body))


def answer_later(request: IRequest, answer: Deferred) -> object:
    """For a ``render_*`` method whose body comes later: write what ``answer`` fires with (the
    body, bytes, once the status and headers are set) and finish, unless the client went away
    first; return what the method returns meanwhile (``NOT_DONE_YET``). ``answer`` must not fail."""
    gone: list = []
    request.notifyFinish().addErrback(gone.append)  # type: ignore[attr-defined]  # twisted.web's Request has it

    def write(body: bytes) -> None:
        if not gone:
            request.write(body)
            request.finish()

    answer.addCallback(write)
    return NOT_DONE_YET


class NotFound(Resource):
    """Any path no route takes, any method: 404 ``{"error":"not found"}``, as the webhook
    routes answer one (Twisted's own page was HTML, and chunked)."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        return json_response(request, 404, {"error": "not found"}, no_store=False)


NOT_FOUND = NotFound()
