"""The one HTTP Site of a server: operational routes, webhooks, and circles reached over HTTP.

WebSocket upgrades of circle paths usually never get here: :mod:`circles.server.http.upgrade` hands them
straight to Autobahn. What does arrive at ``/{circle_pk}`` (a plain GET, an upgrade the router
did not recognise) goes to Autobahn's ``WebSocketResource``; either way the protocol decides
in its opening handshake whether the circle exists (404 if not), so that check lives in one
place. Named routes beside it (``/openrpc.json``, the contract of the server's ``--api``;
``/auth/...``, ``/webhooks/...``, ``/health``, ``/ready``, ``/metrics``) are plain children of
the root; circle ids are hex, so they never collide with those names.
``/playground/`` (the browser playground) is one of them only when the configuration asks.
Request bodies are bounded for every route as they arrive (:mod:`circles.server.http.request_limits`).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.logger import LogLevel
from twisted.web.resource import IResource, Resource, getChildForRequest
from twisted.web.server import Site

from circles.common.keys import PATH_KEY_LENGTHS
from circles.common.logs import Logger, enabled
from circles.server.gateway import Gateway
from circles.server.http.document import Document
from circles.server.http.playground import Playground
from circles.server.http.request_limits import RequestDeadlineChannel, bounded_request_factory
from circles.server.http.responses import NOT_FOUND, answer_later, json_response
from circles.server.metrics import Metrics

access = Logger()  # the access log: debug

INDEX = b"circles WebSocket gateway: connect a WebSocket to /{circle_pk} and speak JSON-RPC 2.0.\n"


class _Health(Resource):
    """``GET /health``: 200 while the process serves (liveness)."""

    isLeaf = True

    def render_GET(self, request):
        return json_response(request, 200, {"status": "ok"}, no_store=False)


class _Ready(Resource):
    """``GET /ready``: 200 when plays can be queued (Redis reachable, and with room) and the
    server is not shutting down, else 503 with the reason (readiness: a load balancer sends
    traffic elsewhere). Under ``--processes`` it answers for every process, with a
    ``processes`` field (each process's state) and 503 while any is not ready or not running
    (:mod:`circles.server.processes.siblings`)."""

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self._gateway = gateway

    def render_GET(self, request):
        gateway = self._gateway
        problem = gateway.unready_reason()
        if problem is None and gateway.siblings is not None:
            return answer_later(request, gateway.siblings.ready().addCallback(self._whole, request))
        if problem is None:
            return json_response(request, 200, {"status": "ready"}, no_store=False)
        return json_response(request, 503, {"status": "unavailable", "reason": problem}, no_store=False)

    def _whole(self, readiness: tuple, request) -> bytes:
        problem, states = readiness
        processes = {str(number): state for number, state in states.items()}
        if problem is None:
            return json_response(request, 200, {"status": "ready", "processes": processes}, no_store=False)
        return json_response(request, 503, {"status": "unavailable", "reason": problem, "processes": processes},
                             no_store=False)


class MetricsPage(Resource):
    """``GET /metrics`` in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        if self._metrics.whole is None:
            return self._metrics.exposition()
        return answer_later(request, self._metrics.whole().addCallback(self._whole, request))

    def _whole(self, exposition: bytes | None, request) -> bytes:
        if exposition is not None:
            return exposition
        # A scrape that fails, not one that lacks counts (Prometheus would read a reset).
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"server process 1, which keeps the server's counts, did not answer\n"


class OnFirstRequest(Resource):
    """A route built at its first request: the routes behind it, and the libraries they load
    (Klein and Werkzeug for ``/auth`` and ``/webhooks``), cost nothing before the port listens.
    ``build`` makes the resource once; every request is then routed into it as if it stood here
    (a leaf itself, this one leaves the rest of the path to it)."""

    isLeaf = True

    def __init__(self, build: Callable[[], IResource]) -> None:
        super().__init__()
        self._build = build
        self._resource: IResource | None = None

    def render(self, request):
        if self._resource is None:
            self._resource = self._build()
        return getChildForRequest(self._resource, request).render(request)


def _auth_routes(gateway: Gateway) -> IResource:
    """``/auth``'s Klein app (:mod:`circles.server.http.nonce_route`), imported when it is built."""
    from circles.server.http.nonce_route import AuthRoutes

    return AuthRoutes(gateway).app.resource()


class Root(Resource):
    """``/`` and the named routes are children; any other single segment is a circle."""

    def __init__(self, circles: IResource, auth: IResource, webhooks: IResource, openrpc: str, playground: bool = False,
                 auth_required: bool = False) -> None:
        super().__init__()
        self._circles = circles
        self.putChild(b"auth", auth)
        self.putChild(b"webhooks", webhooks)
        self.putChild(b"health", _Health())
        if playground:
            self.putChild(b"playground", Playground(auth_required))
        self.putChild(b"", Document(INDEX, b"text/plain; charset=utf-8"))
        self.putChild(b"openrpc.json", Document(openrpc.encode("utf-8"), b"application/json"))

    def getChild(self, path: bytes, request):
        # Only what could be a circle id reaches the WebSocket; the protocol decides whether
        # it is one this server serves (404 there too).
        if len(path) in PATH_KEY_LENGTHS:
            return self._circles
        return NOT_FOUND


class _Site(Site):
    """A Site whose access log is one ``debug`` event per request (``--log-level debug``), not a
    line at info for every health probe and metrics scrape; never with the query string (it may
    carry signatures)."""

    def log(self, request) -> None:
        if not enabled(LogLevel.debug):
            return
        peer = request.getClientAddress()
        access.debug("{method} {path} {status} ({size} bytes) from {peer}",
                     method=request.method.decode("ascii", "replace"),
                     path=request.uri.split(b"?", 1)[0].decode("utf-8", "replace"), status=request.code,
                     size=request.sentLength, peer=getattr(peer, "host", None) or str(peer),
                     user_agent=(request.getHeader(b"user-agent") or b"").decode("utf-8", "replace")[:200])


def edge_site(gateway: Gateway, circles: IResource, webhooks: IResource, openrpc: str, reactor) -> Site:
    """The one Site: the operational routes, ``/auth``, and the server's two faces as given
    (``circles``: the WebSocket resource of every circle; ``webhooks``: the webhook routes);
    ``openrpc``: the text of ``/openrpc.json``, the document of the server's ``--api``."""
    root = Root(circles, OnFirstRequest(lambda: _auth_routes(gateway)), webhooks, openrpc,
                playground=gateway.config.playground, auth_required=gateway.config.auth_required)
    root.putChild(b"ready", _Ready(gateway))
    if gateway.config.metrics_listen is None:  # else only on that endpoint
        root.putChild(b"metrics", MetricsPage(gateway.metrics))
    return _bounded_site(root, gateway, reactor)


def build_metrics_site(gateway: Gateway, reactor) -> Site:
    """The Site of ``--metrics-listen``: ``/metrics`` alone, with the main Site's bounds."""
    return _bounded_site(MetricsPage(gateway.metrics), gateway, reactor)


def _bounded_site(root: Resource, gateway: Gateway, reactor) -> Site:
    # A connection must finish its HTTP request (the WebSocket upgrade) within the handshake
    # timeout, however slowly it trickles; once upgraded, Autobahn's pings and the idle timeout
    # take over.
    # No body is parsed as a form (Twisted's default): no route reads one, and anyone could post a
    # 1 MiB form to any route, 180-370 ms of the reactor's CPU to parse (2 ms as an opaque body).
    site = _Site(root, reactor=reactor, timeout=gateway.config.handshake_timeout,
                 requestFactory=bounded_request_factory(gateway.config.max_request_body, gateway.http_log),
                 parsePOSTFormSubmission=False)
    # The timeout bounds a whole request, not one silence.
    site.protocol = RequestDeadlineChannel  # type: ignore[method-assign, assignment]
    site.displayTracebacks = False
    site.noisy = False  # no "Starting factory <...>" lines (circles.common.logs: what info shows)
    return site
