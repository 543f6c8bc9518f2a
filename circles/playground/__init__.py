"""The browser playground: a static page at ``/playground/``, served only with ``--playground``.

A person enters a script, connects to a circle, signs in with their browser wallet
(``window.ethereum``, EIP-1193: ``personal_sign`` of the nonce) and plays it. The page holds no
keys and does no cryptography: the wallet signs, the server recovers the key from the
signature. Off by default because a gateway in production has no use for it. The files are
read once at import; a strict Content-Security-Policy allows only them and WebSockets.
"""

from __future__ import annotations

from importlib.resources import files

from twisted.web.resource import NoResource, Resource
from twisted.web.util import redirectTo

_FILES = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"index.html": ("index.html", b"text/html; charset=utf-8"),
    b"playground.js": ("playground.js", b"text/javascript; charset=utf-8"),
    b"playground.css": ("playground.css", b"text/css; charset=utf-8"),
}

CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class _File(Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes) -> None:
        super().__init__()
        self._body = body
        self._content_type = content_type

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", self._content_type)
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        return self._body


class Playground(Resource):
    """``/playground`` redirects to ``/playground/`` (the page uses relative URLs)."""

    def __init__(self) -> None:
        super().__init__()
        here = files(__package__)
        self._files = {name: _File(here.joinpath(filename).read_bytes(), content_type)
                       for name, (filename, content_type) in _FILES.items()}

    def getChild(self, path: bytes, request) -> Resource:
        return self._files.get(path) or NoResource()

    def render_GET(self, request) -> bytes:
        return redirectTo(b"playground/", request)
