"""The JSON answers of the HTTP routes, byte for byte: one helper (circles.server.http.responses) makes
them all, and each route still sends what it always sent (status, the headers that matter, body).

Over an in-memory transport, through the Site a server builds.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from circles.backend.scripts import BackendUnavailable, IScriptRunner, Queued
from circles.protocol import CircleFactory
from circles.server.config import Config
from circles.server.gateway import Gateway
from circles.server.http.document import Document
from circles.server.http.responses import json_response
from circles.server.http.site import OnFirstRequest
from circles.server.providers.secrets import WebhookSecrets
from circles.service import build_site
from devtools.webhook_support import STRIPE_SECRET, encode, stripe_event, stripe_headers

from ..inmemory import session_layer
from ..support import Key

CIRCLE = Key(bytes([1]) * 32).pubkey  # fixed: named in test ids, which every xdist worker must collect alike
UNSERVED = Key(bytes([2]) * 32).pubkey  # fixed: named in test ids, which every xdist worker must collect alike
NOW = 1_700_000_000
PEER = IPv4Address("TCP", "192.0.2.1", 40000)


@implementer(IScriptRunner)
class Runner:
    """Connected or not; queues a webhook's task, fails to, or breaks (a bug of ours)."""

    def __init__(self, connected: bool = True, outcome: str = "queued") -> None:
        self.connected = connected
        self.outcome = outcome

    def is_connected(self) -> bool:
        return self.connected

    def run(self, request):
        return fail(BackendUnavailable("not here"))

    def enqueue_once(self, request, data_json, key, ttl):
        if self.outcome == "broken":
            raise RuntimeError("a bug")
        if self.outcome == "down":
            return fail(BackendUnavailable("Redis is unreachable"))
        return succeed(Queued("task-1", duplicate=self.outcome == "duplicate"))


def exchange(raw: bytes, runner: Runner) -> tuple[bytes, dict, bytes]:
    """Send one raw HTTP request to a fresh server's Site: (status line, headers, body)."""
    clock = Clock()
    clock.advance(NOW)
    config = Config(circles=[CIRCLE], stripe_secrets=WebhookSecrets.of(STRIPE_SECRET))
    site = build_site(CircleFactory(session_layer(Gateway(config, clock, runner))), clock)
    channel = site.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, value in (line.split(b": ", 1) for line in lines)}
    # Every answer whole, with its length: not chunked (Klein's routes were, three sends an answer).
    assert b"transfer-encoding" not in headers and headers[b"content-length"] == b"%d" % len(body), (headers, body)
    return status, headers, body


def get(path: str, runner: Runner = None) -> tuple[bytes, dict, bytes]:
    return exchange(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), runner or Runner())


def post(path: str, body: bytes, headers: dict, runner: Runner = None) -> tuple[bytes, dict, bytes]:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    raw = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n{lines}\r\n"
    return exchange(raw.encode() + body, runner or Runner())


def stripe_delivery(runner: Runner) -> tuple[bytes, dict, bytes]:
    body = encode(stripe_event("evt_1"))
    return post(f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body, timestamp=NOW), runner)


# --- the helper ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options, body, no_store", [
    ({}, b'{"a":1,"b":[1,2]}', True),
    ({"compact": False}, b'{"a": 1, "b": [1, 2]}', True),
    ({"no_store": False}, b'{"a":1,"b":[1,2]}', False),
])
def test_json_response_sets_status_type_and_caching(options, body, no_store):
    request = DummyRequest([b""])
    assert json_response(request, 418, {"a": 1, "b": [1, 2]}, **options) == body
    assert request.responseCode == 418
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"%d" % len(body)]
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert request.responseHeaders.getRawHeaders(b"cache-control") == ([b"no-store"] if no_store else None)


# --- routes built at their first request (/auth, /webhooks: Klein loads then, not at start-up) -----


def test_a_route_is_built_at_its_first_request_and_only_then():
    built = []

    def build():
        built.append(Resource())  # not a leaf: the rest of the path is routed into it
        built[-1].putChild(b"x", Document(b"the route", b"text/plain"))
        return built[-1]

    route = OnFirstRequest(build)
    assert built == []
    answers = [route.render(DummyRequest([b"x"])) for _ in range(3)]
    assert answers == [b"the route"] * 3
    assert len(built) == 1


# --- every route, as it always answered -----------------------------------------------------------


def test_health_and_ready():
    status, headers, body = get("/health")
    assert (status, headers[b"content-type"], body) == (b"HTTP/1.1 200 OK", b"application/json", b'{"status":"ok"}')
    assert b"cache-control" not in headers
    status, headers, body = get("/ready")
    assert (status, headers[b"content-type"], body) == (b"HTTP/1.1 200 OK", b"application/json", b'{"status":"ready"}')
    assert b"cache-control" not in headers
    status, headers, body = get("/ready", Runner(connected=False))
    assert status == b"HTTP/1.1 503 Service Unavailable" and headers[b"content-type"] == b"application/json"
    # Compact like /health and /ready's 200 (it was spaced, for no reason but history).
    assert body == b'{"status":"unavailable","reason":"script backend unavailable"}'
    assert b"cache-control" not in headers


def test_auth_routes():
    status, headers, body = get("/auth/health")
    assert status == b"HTTP/1.1 200 OK"
    assert (headers[b"content-type"], headers[b"cache-control"]) == (b"application/json", b"no-store")
    assert body == b'{"status": "healthy", "active_nonces": 0, "timestamp": %d}' % NOW
    status, headers, body = get(f"/auth/nonce?public_key={CIRCLE}")
    assert status == b"HTTP/1.1 200 OK" and headers[b"cache-control"] == b"no-store"
    assert body.startswith(b'{"nonce": "') and body.endswith(b'", "expires_at": %d}' % (NOW + 300))
    status, headers, body = get("/auth/nonce?public_key=02zz")
    assert status == b"HTTP/1.1 400 Bad Request" and headers[b"cache-control"] == b"no-store"
    assert body.startswith(b'{"error": "public_key: ') and json.loads(body).keys() == {"error"}


@pytest.mark.parametrize("runner, status, body, extra", [
    (Runner(), b"200 OK", b'{"received":true,"task_id":"task-1"}', {}),
    (Runner(outcome="duplicate"), b"200 OK", b'{"received":true,"task_id":"task-1","duplicate":true}', {}),
    (Runner(outcome="down"), b"503 Service Unavailable", b'{"error":"backend unavailable, retry later"}',
     {b"retry-after": b"30"}),
    (Runner(outcome="broken"), b"500 Internal Server Error", b'{"error":"internal error"}', {}),
])
def test_webhook_deliveries(runner, status, body, extra):
    got_status, headers, got_body = stripe_delivery(runner)
    assert (got_status, got_body) == (b"HTTP/1.1 " + status, body)
    assert (headers[b"content-type"], headers[b"cache-control"]) == (b"application/json", b"no-store")
    assert {name: headers.get(name) for name in extra} == extra


@pytest.mark.parametrize("method, path, status, body, extra", [
    ("POST", "/webhooks/nope/x", b"404 Not Found", b'{"error":"not found"}', {}),
    ("GET", f"/webhooks/stripe/{CIRCLE}", b"405 Method Not Allowed", b'{"error":"method not allowed, use POST"}',
     {b"allow": b"POST"}),
    ("POST", f"/webhooks/stripe/{UNSERVED}", b"404 Not Found", b'{"error":"unknown circle"}', {}),
    ("POST", f"/webhooks/idenfy/{CIRCLE}", b"404 Not Found", b'{"error":"idenfy webhooks are not configured"}', {}),
    ("POST", f"/webhooks/stripe/{CIRCLE}", b"401 Unauthorized", None, {}),
    ("GET", "/webhooks/", b"404 Not Found", b'{"error":"not found"}', {}),
])
def test_webhook_refusals(method, path, status, body, extra):
    if method == "GET":
        got_status, headers, got_body = get(path)
    else:
        got_status, headers, got_body = post(path, b"{}", {"Content-Type": "application/json"})
    assert got_status == b"HTTP/1.1 " + status
    if body is None:
        assert got_body.startswith(b'{"error":"') and json.loads(got_body).keys() == {"error"}
    else:
        assert got_body == body
    assert (headers[b"content-type"], headers[b"cache-control"]) == (b"application/json", b"no-store")
    assert {name: headers.get(name) for name in extra} == extra


@pytest.mark.parametrize("method, path", [("GET", "/nothing"), ("GET", "/a/b/c"), ("POST", "/nothing"),
                                          ("GET", "/playground/nothing.js")])
def test_a_path_no_route_takes_is_a_json_404(method, path):
    """Twisted's own page was HTML (and chunked); every other answer of the server is JSON."""
    status, headers, body = get(path) if method == "GET" else post(path, b"x", {})
    assert (status, headers[b"content-type"], body) == (b"HTTP/1.1 404 Not Found", b"application/json",
                                                        b'{"error":"not found"}')


@pytest.mark.parametrize("raw", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n",
], ids=["no-colon", "nul-in-value", "two-lengths", "negative-length", "gzip", "bad-chunk", "request-line"])
def test_a_malformed_request_is_a_400_that_says_so(raw):
    """Twisted answered these with the status line alone."""
    status, headers, body = exchange(raw, Runner())
    assert (status, headers[b"content-type"]) == (b"HTTP/1.1 400 Bad Request", b"application/json")
    assert json.loads(body) == {"error": "malformed HTTP/1.1 request (RFC 9112): its request line, a header or its "
                                         "chunked body"}
