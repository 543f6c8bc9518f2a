"""The webhook endpoints over real HTTP, with a recording script backend and a fake clock.

Every refusal is checked twice: the status and short JSON body, and that nothing was queued.
Redis, the reference worker and twistd are in tests/integration/test_webhooks_e2e.py; a refusal
over real TLS in tests/integration/test_webhooks.py.
"""

from __future__ import annotations

import hmac
import json

import coincurve
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from circles import webhooks
from circles.backend.scripts import SOURCE_IDENFY, SOURCE_STRIPE, BackendUnavailable, IScriptRunner, Queued
from circles.protocol import CircleFactory
from circles.server.config import Config
from circles.server.gateway import Gateway
from circles.server.providers.secrets import WebhookSecrets
from circles.service import build_site
from devtools.webhook_support import (
    IDENFY_SECRET,
    STRIPE_SECRET,
    STRIPE_SECRET_OLD,
    encode,
    idenfy_callback,
    idenfy_headers,
    post,
    raw_exchange,
    stripe_event,
    stripe_headers,
)

from ..inmemory import session_layer
from ..play_client import new_key, pk

CIRCLE = pk(new_key())
OTHER_CIRCLE = pk(new_key())  # served, with a Stripe secret of its own
UNSERVED = pk(new_key())
NOW = 1_750_000_000


@implementer(IScriptRunner)
class Recorder:
    """Remembers what would have been queued; ``down`` makes it refuse like an unreachable Redis."""

    def __init__(self) -> None:
        self.queued: list = []
        self.seen: dict = {}
        self.down = False

    def run(self, request):
        return fail(BackendUnavailable("not here"))

    def enqueue_once(self, request, data_json, key, ttl):
        if self.down:
            return fail(BackendUnavailable("Redis is unreachable"))
        if key in self.seen:
            return succeed(Queued(self.seen[key], duplicate=True))
        task_id = f"task-{len(self.queued) + 1}"
        self.seen[key] = task_id
        self.queued.append((request, data_json, key, ttl))
        return succeed(Queued(task_id))


class Server:
    def __init__(self, **config) -> None:
        config.setdefault("circles", [CIRCLE, OTHER_CIRCLE])
        config.setdefault("stripe_secrets", WebhookSecrets.of(STRIPE_SECRET, STRIPE_SECRET_OLD,
                                                              **{OTHER_CIRCLE: ["whsec_other_circle"]}))
        config.setdefault("idenfy_secrets", WebhookSecrets.of(IDENFY_SECRET))
        self.config = Config(**config)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.scripts = Recorder()
        site = build_site(CircleFactory(session_layer(Gateway(self.config, self.clock, self.scripts))), reactor)
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def stripe(self, body: bytes, circle: str = CIRCLE, **sign):
        sign.setdefault("timestamp", int(self.clock.seconds()))
        return post(self.port, f"/webhooks/stripe/{circle}", body, stripe_headers(body, **sign))

    def idenfy(self, body: bytes, circle: str = CIRCLE, **sign):
        return post(self.port, f"/webhooks/idenfy/{circle}", body, idenfy_headers(body, **sign))


@pytest_twisted.async_yield_fixture
async def make_server():
    servers = []

    def make(**config) -> Server:
        servers.append(Server(**config))
        return servers[-1]

    yield make
    for server in servers:
        await server.listening.stopListening()


@pytest.fixture
def server(make_server) -> Server:
    return make_server()


def refused(reply, code: int, error_part: str = "") -> None:
    assert reply.code == code, reply
    assert reply.header("content-type") == "application/json"
    assert len(reply.body) < 200 and b"Traceback" not in reply.body
    assert error_part in reply.json()["error"]


# -- accepted -----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_stripe_event_is_queued(server):
    body = encode(stripe_event("evt_1"))
    reply = await server.stripe(body)
    assert reply.code == 200 and reply.json() == {"received": True, "task_id": "task-1"}
    [(request, data, key, ttl)] = server.scripts.queued
    assert request.circle == CIRCLE and request.caller == "" and request.source == SOURCE_STRIPE
    assert request.script == webhooks.STRIPE_SCRIPT
    assert request.timeout == server.config.webhook_deadline
    assert data.encode("utf-8") == body  # the provider's body, byte for byte
    assert ttl == server.config.webhook_dedupe_ttl and key.startswith(f"stripe:{CIRCLE}:")


@pytest_twisted.ensureDeferred
async def test_idenfy_callback_is_queued(server):
    body = encode(idenfy_callback("scan-1"))
    reply = await server.idenfy(body)
    assert reply.code == 200 and reply.json() == {"received": True, "task_id": "task-1"}
    [(request, data, key, _)] = server.scripts.queued
    assert request.source == SOURCE_IDENFY and request.script == webhooks.IDENFY_SCRIPT and request.caller == ""
    assert data.encode("utf-8") == body and key.startswith(f"idenfy:{CIRCLE}:")


@pytest_twisted.ensureDeferred
async def test_uncompressed_circle_key_names_the_same_circle(server):
    uncompressed = coincurve.PublicKey(bytes.fromhex(CIRCLE)).format(compressed=False).hex()
    reply = await server.stripe(encode(stripe_event()), circle=uncompressed)
    assert reply.code == 200
    assert server.scripts.queued[0][0].circle == CIRCLE


@pytest_twisted.ensureDeferred
async def test_rotation_old_secret_and_several_v1(server):
    body = encode(stripe_event())
    assert (await server.stripe(body, secret=STRIPE_SECRET_OLD)).code == 200
    # Stripe sends one v1 per live secret while a secret is rolled: any may match.
    body = encode(stripe_event())
    new = stripe_headers(body, secret="whsec_not_ours", timestamp=NOW)["Stripe-Signature"]
    ours = stripe_headers(body, timestamp=NOW)["Stripe-Signature"]
    header = new + "," + ours.split(",", 1)[1] + ",v0=" + "0" * 64
    reply = await post(server.port, f"/webhooks/stripe/{CIRCLE}", body, {"Stripe-Signature": header})
    assert reply.code == 200, reply
    assert len(server.scripts.queued) == 2


@pytest_twisted.ensureDeferred
async def test_timestamp_within_tolerance_either_side(server):
    for skew in (-300, 300):
        body = encode(stripe_event())
        assert (await server.stripe(body, timestamp=NOW + skew)).code == 200


@pytest_twisted.ensureDeferred
async def test_duplicates_are_acknowledged_not_queued(server):
    body = encode(stripe_event("evt_dup"))
    first = await server.stripe(body)
    server.clock.advance(3600)  # Stripe's retry comes later, signed anew
    again = await server.stripe(body)
    assert again.code == 200 and again.json() == {"received": True, "task_id": first.json()["task_id"],
                                                  "duplicate": True}
    # iDenfy: the same scanRef with the same final status is a duplicate, a new status is not.
    await server.idenfy(encode(idenfy_callback("scan-9", "REVIEWING", final=False)))
    assert (await server.idenfy(encode(idenfy_callback("scan-9", "APPROVED")))).json().get("duplicate") is None
    assert (await server.idenfy(encode(idenfy_callback("scan-9", "APPROVED")))).json()["duplicate"] is True
    assert len(server.scripts.queued) == 3


@pytest_twisted.ensureDeferred
async def test_unknown_fields_are_kept(server):
    event = stripe_event(brand_new_field={"nested": [1, 2]}, context="acct_1")
    body = encode(event)
    assert (await server.stripe(body)).code == 200
    assert json.loads(server.scripts.queued[0][1]) == event


@pytest_twisted.ensureDeferred
async def test_script_override(make_server):
    server = make_server(stripe_script="print(CIRCLES_DATA);\n", idenfy_script="kyc(CIRCLES_DATA);\n")
    await server.stripe(encode(stripe_event()))
    await server.idenfy(encode(idenfy_callback()))
    assert [q[0].script for q in server.scripts.queued] == ["print(CIRCLES_DATA);\n", "kyc(CIRCLES_DATA);\n"]


# -- 401 ----------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("header", [
    None, "", "garbage", "t=,v1=", "v1=" + "a" * 64, "t=1750000000", "t=1750000000,v1=nothex",
    "t=1750000000,v1=" + "a" * 63, "t=abc,v1=" + "a" * 64, "t=1750000000,t=1750000000,v1=" + "a" * 64,
    "t=1750000000,v0=" + "a" * 64, "t=-5,v1=" + "a" * 64, "t=1750000000,v1=" + "a" * 64 + "\u00e9",
])
async def test_stripe_missing_or_malformed_signature(server, header):
    headers = {} if header is None else {"Stripe-Signature": header}
    reply = await post(server.port, f"/webhooks/stripe/{CIRCLE}", encode(stripe_event()), headers)
    refused(reply, 401)
    assert server.scripts.queued == []


@pytest_twisted.ensureDeferred
async def test_stripe_bad_signatures(server):
    body = encode(stripe_event())
    refused(await server.stripe(body, secret="whsec_someone_else"), 401, "no valid signature")
    tampered = body.replace(b"2000", b"9000")
    headers = stripe_headers(body, timestamp=NOW)
    refused(await post(server.port, f"/webhooks/stripe/{CIRCLE}", tampered, headers), 401, "no valid signature")
    refused(await server.stripe(body, timestamp=NOW - 301), 401, "tolerance")
    refused(await server.stripe(body, timestamp=NOW + 301), 401, "tolerance")
    # A secret of one circle is no good for another circle with its own.
    refused(await server.stripe(body, circle=OTHER_CIRCLE), 401)
    assert (await server.stripe(body, circle=OTHER_CIRCLE, secret="whsec_other_circle")).code == 200
    assert len(server.scripts.queued) == 1


@pytest_twisted.ensureDeferred
async def test_tolerance_follows_the_injected_clock(make_server):
    server = make_server(webhook_tolerance=10)
    body = encode(stripe_event())
    headers = stripe_headers(body, timestamp=NOW)
    server.clock.advance(11)
    refused(await post(server.port, f"/webhooks/stripe/{CIRCLE}", body, headers), 401, "tolerance")
    assert server.scripts.queued == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("header", [None, "", "zz", "a" * 63, "a" * 65, "sha256=" + "a" * 64])
async def test_idenfy_missing_or_malformed_signature(server, header):
    headers = {} if header is None else {"Idenfy-Signature": header}
    refused(await post(server.port, f"/webhooks/idenfy/{CIRCLE}", encode(idenfy_callback()), headers), 401)
    assert server.scripts.queued == []


@pytest_twisted.ensureDeferred
async def test_idenfy_bad_signatures(server):
    body = encode(idenfy_callback())
    refused(await server.idenfy(body, secret="another"), 401, "no valid signature")
    headers = idenfy_headers(body)
    refused(await post(server.port, f"/webhooks/idenfy/{CIRCLE}", body + b" ", headers), 401)
    # A Stripe signature is no iDenfy signature, even with the same secret.
    refused(await post(server.port, f"/webhooks/idenfy/{CIRCLE}", body, stripe_headers(body, IDENFY_SECRET, NOW)), 401)
    assert server.scripts.queued == []


# -- 400 ----------------------------------------------------------------------------------------

STRIPE_BAD = [
    b"", b"not json", b"[1, 2]", b'"event"', b"\xff\xfe{}", b"[" * 100_000, b'{"id": NaN}',
    encode(stripe_event(data={"object": json.loads('{"a":' * 300 + "1" + "}" * 300)})),
    encode({k: v for k, v in stripe_event().items() if k != "id"}),
    encode(stripe_event(id="")), encode(stripe_event(type=7)), encode(stripe_event(created="today")),
    encode(stripe_event(created=True)), encode(stripe_event(livemode="no")), encode(stripe_event(data=[])),
    encode(stripe_event(data={"object": "pi_1"})), encode(stripe_event(api_version=2024)),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("body", STRIPE_BAD, ids=range(len(STRIPE_BAD)))
async def test_stripe_bad_body(server, body):
    # stripe's signer takes text; a body that is not UTF-8 is signed by hand to reach the parser
    headers = {"Stripe-Signature": f"t={NOW},v1=" + hmac.new(STRIPE_SECRET.encode(), b"%d." % NOW + body,
                                                           "sha256").hexdigest()}
    if body.startswith(b"\xff"):
        reply = await post(server.port, f"/webhooks/stripe/{CIRCLE}", body, headers)
    else:
        reply = await server.stripe(body)
    refused(reply, 400)
    assert server.scripts.queued == []


IDENFY_BAD = [
    b"{", b"null", encode(idenfy_callback(scanRef="")), encode(idenfy_callback(final="yes")),
    encode(idenfy_callback(status="APPROVED")), encode(idenfy_callback(overall="MAYBE")),
    encode(idenfy_callback(clientId=None)), encode(idenfy_callback(data="x")),
    encode({k: v for k, v in idenfy_callback().items() if k != "status"}),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("body", IDENFY_BAD, ids=range(len(IDENFY_BAD)))
async def test_idenfy_bad_body(server, body):
    refused(await server.idenfy(body), 400)
    assert server.scripts.queued == []


@pytest_twisted.ensureDeferred
async def test_signature_is_checked_before_the_body(server):
    refused(await post(server.port, f"/webhooks/stripe/{CIRCLE}", b"not json", {"Stripe-Signature": "x"}), 401)


# -- 404, 405 -----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_unknown_circle_provider_or_path(server):
    body = encode(stripe_event())
    for circle in (UNSERVED, "nothex", "02" + "00" * 32, CIRCLE[:-2]):
        refused(await server.stripe(body, circle=circle), 404, "unknown circle")
    for path in ("/webhooks/paypal/" + CIRCLE, "/webhooks/stripe", "/webhooks/", "/webhooks/stripe/a/b"):
        refused(await post(server.port, path, body, stripe_headers(body, timestamp=NOW)), 404)
    assert server.scripts.queued == []


@pytest_twisted.ensureDeferred
async def test_provider_without_secret_is_off(make_server, monkeypatch):
    server = make_server(idenfy_secrets=WebhookSecrets(), stripe_secrets=WebhookSecrets.of(
        **{OTHER_CIRCLE: ["whsec_other_circle"]}))
    body = encode(idenfy_callback())
    refused(await server.idenfy(body), 404, "not configured")
    refused(await post(server.port, f"/webhooks/idenfy/{CIRCLE}", body, {}), 404, "not configured")
    # Stripe is on for the circle with a secret of its own only.
    refused(await server.stripe(encode(stripe_event()), secret="whsec_other_circle"), 404, "not configured")
    assert (await server.stripe(encode(stripe_event()), circle=OTHER_CIRCLE, secret="whsec_other_circle")).code == 200


@pytest_twisted.ensureDeferred
async def test_wrong_method(server):
    for method in (b"GET", b"PUT", b"DELETE", b"HEAD"):
        reply = await post(server.port, f"/webhooks/stripe/{CIRCLE}", method=method)
        assert reply.code == 405 and reply.header("allow") == "POST"
    assert server.scripts.queued == []


# -- 413 ----------------------------------------------------------------------------------------

def head(path: str, length: int, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (path.encode(), length, extra))


@pytest_twisted.ensureDeferred
async def test_declared_length_over_limit_is_refused_before_the_body(make_server):
    server = make_server(max_request_body=1000)
    path = f"/webhooks/stripe/{CIRCLE}"
    # 10 GiB announced, none sent: the answer comes at once, nothing is waited for or stored.
    answer, _ = await raw_exchange(server.port, head(path, 10 * 2**30, b"Expect: 100-continue\r\n"))
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"100 Continue" not in answer and answer.endswith(b'{"error":"request body too large"}')
    # A client that sends anyway is cut off; what it sent was never stored.
    answer, sent = await raw_exchange(server.port, head(path, 10 * 2**30), b"x" * 65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert server.scripts.queued == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_limit_is_refused_while_it_arrives(make_server):
    server = make_server(max_request_body=1000)
    start = (b"POST /webhooks/stripe/%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % CIRCLE.encode())
    answer, sent = await raw_exchange(server.port, start, b"100\r\n" + b"x" * 256 + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert server.scripts.queued == []


def chunked(path: str, body: bytes, size: int) -> bytes:
    """A whole request with ``body`` in chunks of ``size`` bytes, signed as Stripe signs it."""
    headers = "".join(f"{k}: {v}\r\n" for k, v in stripe_headers(body, timestamp=NOW).items())
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            f"Connection: close\r\n{headers}\r\n").encode() + chunks + b"0\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_a_body_in_too_many_chunks_is_refused_once_they_pass_the_limit(make_server, monkeypatch):
    """Twisted's decoder spends some 3 us on a chunk however small: 1 MiB in 1-byte chunks took
    3 s of the reactor's CPU (1 MiB in one piece, 2 ms). A body comes in MAX_CHUNKS chunks at
    most; past them it is refused at once, and what the same read brought is not decoded."""
    from circles.server.http.request_limits import MAX_CHUNKS, BoundedRequest

    decoded = []
    handle = BoundedRequest.handleContentChunk
    monkeypatch.setattr(BoundedRequest, "handleContentChunk", lambda self, data: decoded.append(1) or handle(self, data))
    server = make_server()
    path = f"/webhooks/stripe/{CIRCLE}"
    body = encode(stripe_event("evt_in_chunks"))
    body = body[:-1] + b" " * (MAX_CHUNKS - len(body)) + b"}"  # MAX_CHUNKS bytes: one a chunk
    answer, _ = await raw_exchange(server.port, chunked(path, body, 1))
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert len(server.scripts.queued) == 1 and len(decoded) == MAX_CHUNKS
    # One chunk more, and 100,000 more in the same write: refused, and the decoding stopped there.
    decoded.clear()
    body = encode(stripe_event("evt_in_too_many_chunks"))
    body = body[:-1] + b" " * (MAX_CHUNKS + 100_000 - len(body)) + b"}"
    answer, _ = await raw_exchange(server.port, chunked(path, body, 1))
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert answer.endswith(b'{"error":"request body in too many chunks (at most %d)"}' % MAX_CHUNKS)
    assert len(decoded) == MAX_CHUNKS and len(server.scripts.queued) == 1
    # The same body in fewer, larger chunks is fine.
    answer, _ = await raw_exchange(server.port, chunked(path, body, 1000))
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert len(server.scripts.queued) == 2


@pytest_twisted.ensureDeferred
async def test_body_at_the_limit_is_accepted(make_server):
    body = encode(stripe_event())
    body = body[:-1] + b" " * 10 + b"}"
    server = make_server(max_request_body=len(body))
    assert (await server.stripe(body)).code == 200
    refused(await server.stripe(body[:-1] + b" }"), 413)


@pytest_twisted.ensureDeferred
async def test_other_routes_still_work_after_a_refusal(make_server):
    server = make_server(max_request_body=10)
    reply = await post(server.port, "/auth/health", method=b"GET")
    assert reply.code == 200


# -- 503 ----------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_backend_unavailable_is_503(server):
    server.scripts.down = True
    reply = await server.stripe(encode(stripe_event("evt_later")))
    refused(reply, 503)
    assert reply.header("retry-after") == "30"
    server.scripts.down = False
    assert (await server.stripe(encode(stripe_event("evt_later")))).json() == {"received": True, "task_id": "task-1"}


# -- never logged -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_secrets_and_signatures_never_logged(server):
    from circles.common import logs
    lines: list = []
    globalLogPublisher.addObserver(lines.append)
    logs.set_level("debug")  # every line a delivery writes (queued: at debug), secrets in none
    try:
        body = encode(stripe_event())
        headers = stripe_headers(body, timestamp=NOW)
        await post(server.port, f"/webhooks/stripe/{CIRCLE}", body, headers)
        await server.stripe(body, secret="whsec_wrong_one")
        await server.idenfy(encode(idenfy_callback()))
    finally:
        logs.set_level("info")
        globalLogPublisher.removeObserver(lines.append)
    text = "\n".join(formatEvent(e) + repr(e) for e in lines)
    assert "task-1" in text  # the log does say what happened
    signature = headers["Stripe-Signature"].split("v1=")[1]
    for secret in (STRIPE_SECRET, STRIPE_SECRET_OLD, IDENFY_SECRET, "whsec_wrong_one", signature, "JOHN"):
        assert secret not in text
    assert STRIPE_SECRET not in repr(server.config)


@pytest_twisted.ensureDeferred
async def test_refusals_write_a_bounded_log(server):
    """Anyone may post forged deliveries as fast as they like: 50 refusal lines a minute, then
    one line summing up the rest (circles.common.log_budget.LogBudget, on the gateway's clock)."""
    lines: list = []
    globalLogPublisher.addObserver(lines.append)
    try:
        for i in range(100):
            refused(await server.stripe(encode(stripe_event(f"evt_{i}")), secret="whsec_forged"), 401)
        for _ in range(20):
            refused(await post(server.port, f"/webhooks/idenfy/{UNSERVED}", b"{}"), 404)
        for _ in range(10):  # bodies over the limit, on any route
            answer, _ = await raw_exchange(server.port, head(f"/webhooks/stripe/{CIRCLE}", 10 * 2**30))
            assert answer.startswith(b"HTTP/1.1 413 ")
        refusals = [e for e in lines if "refused" in (e.get("log_format") or "")]
        assert len(refusals) == 50
        server.clock.advance(60)
    finally:
        globalLogPublisher.removeObserver(lines.append)
    [summary] = [e for e in lines if e.get("subject") == "refused HTTP requests"]
    assert summary["unlogged"] == 80
    assert summary["by_kind"] == {"stripe 401": 50, "idenfy 404": 20, "413": 10}
    assert summary["busiest"] == {"127.0.0.1": 80}
