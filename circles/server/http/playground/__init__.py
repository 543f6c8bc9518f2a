"""The browser playground: a static page at ``/playground/``, served only with ``--playground``.

A person enters a script, connects to a circle, signs in and plays it. Signing in is with their
browser wallet (``window.ethereum``, EIP-1193: ``personal_sign`` of the nonce; the page holds no
key, the server recovers it from the signature), the default where there is one; or, to try a
local server without a wallet, with a throw-away development key the page makes and keeps in
the browser's storage, signing with @noble/curves (``noble-secp256k1.js``, vendored from npm by
``scripts/vendor-noble``, its licenses in ``noble-secp256k1.LICENSE``). Off by default because a
gateway in production has no use for it. The files are read once when the server starts; a strict
Content-Security-Policy allows only them and WebSockets.

The page learns from the server that serves it whether plays need a sign-in (``--auth``): its
``<body>`` says ``data-auth="required"`` (else ``"open"``), and Play waits for a sign-in then,
rather than answer -32001 after the click. The server's mode is set at start-up, so the page's
bytes are made once, like the others'.
"""

from __future__ import annotations

from importlib.resources import files

from twisted.web.resource import IResource, Resource
from twisted.web.util import redirectTo

from circles.server.http.document import Document
from circles.server.http.responses import NOT_FOUND

_FILES = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"index.html": ("index.html", b"text/html; charset=utf-8"),
    b"playground.js": ("playground.js", b"text/javascript; charset=utf-8"),
    b"playground.css": ("playground.css", b"text/css; charset=utf-8"),
    b"noble-secp256k1.js": ("noble-secp256k1.js", b"text/javascript; charset=utf-8"),
    b"noble-secp256k1.LICENSE": ("noble-secp256k1.LICENSE", b"text/plain; charset=utf-8"),
}

CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


#: Sent with every file of the page.
_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
)


class Playground(Resource):
    """``/playground`` redirects to ``/playground/`` (the page uses relative URLs)."""

    def __init__(self, auth_required: bool = False) -> None:
        super().__init__()
        here = files(__package__)
        mode = b'<body data-auth="required">' if auth_required else b'<body data-auth="open">'

        def content(filename: str) -> bytes:
            data = here.joinpath(filename).read_bytes()
            return data.replace(b"<body>", mode, 1) if filename == "index.html" else data

        self._files = {name: Document(content(filename), content_type, _HEADERS)
                       for name, (filename, content_type) in _FILES.items()}

    def getChild(self, path: bytes, request) -> IResource:
        return self._files.get(path) or NOT_FOUND

    def render_GET(self, request) -> bytes:
        return redirectTo(b"playground/", request)
