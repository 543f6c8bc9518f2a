"""A fixed document as a resource: the index, ``/openrpc.json``, the playground's files."""

from __future__ import annotations

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource


class Document(Resource):
    """A fixed body for GET, with its content type and any other headers it needs."""

    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes, headers: tuple = ()) -> None:
        super().__init__()
        self._body = body
        self._headers = ((b"content-type", content_type), *headers)

    def render_GET(self, request: IRequest) -> bytes:
        for name, value in self._headers:
            request.setHeader(name, value)
        return self._body
