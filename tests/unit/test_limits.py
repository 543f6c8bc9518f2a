"""Every limit with a test that fails when the limit does not hold.

In memory (a ``Clock``) where only arithmetic is at stake: the request rate, the nonce cap, the
origin rule. Over real loopback sockets against an in-process ``CirclesService`` for the limits
decided at once: connection counts, origins, replies over the limit. What waits out a real
timeout (handshake, idle, pings, a client that does not read) and shutdown as an operator runs
it (``twistd``, SIGTERM) are in tests/integration/test_limits.py.

Blocking clients (the ``websockets`` sync client, raw sockets) run in threads so the reactor,
which runs the server in this same process, keeps turning. Waits poll with a deadline; nothing
asserts how fast anything happens, only that it happens within a generous bound.
"""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
import websockets
from twisted.internet import reactor, threads
from twisted.internet.task import Clock
from twisted.python import usage
from websockets.sync.client import connect

from circles import CirclesService, Config, server_tap
from circles.server.gateway import Gateway

from ..inmemory import NoScriptBackend, open_session, replied
from ..play_client import eventually, new_key, pk
from ..support import Key, request

CIRCLE = pk(new_key())
LOOPBACK = "tcp:0:interface=127.0.0.1"


# --- helpers ---------------------------------------------------------------------------------------


def _request(id_, method="whoami", params=None) -> dict:
    message = {"jsonrpc": "2.0", "method": method}
    if id_ is not None:
        message["id"] = id_
    if params is not None:
        message["params"] = params
    return message


def send(session, message):
    """One message through ``Session.answer``: the parsed reply, or None when none is sent."""
    text = replied(session.answer(json.dumps(message).encode("utf-8")))
    return None if text is None else json.loads(text)


def in_memory(clock=None, **config):
    clock = clock if clock is not None else Clock()
    return clock, open_session(Gateway(Config(**config), clock, NoScriptBackend()), CIRCLE)


async def serve(start, **config) -> tuple[CirclesService, int]:
    """An in-process server on a loopback port, with no script backend (no Redis needed)."""
    config.setdefault("circles", [CIRCLE])
    service = start(CirclesService(Config(listen=(LOOPBACK,), **config), reactor=reactor, scripts=NoScriptBackend()))
    [port] = await service.when_listening()
    return service, port.getHost().port


def in_thread(f, *args, **kwargs):
    return threads.deferToThread(f, *args, **kwargs)


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/{CIRCLE}"


def open_ws(port: int, source: str = "127.0.0.1", **kwargs):
    """A ``websockets`` sync connection (blocking: call it in a thread), from ``source``."""
    kwargs.setdefault("open_timeout", 30)
    kwargs.setdefault("ping_interval", None)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return connect(ws_url(port), sock=sock, legacy=True, **kwargs)  # held across calls, closed by the test


def refused_status(port: int, source: str = "127.0.0.1", **kwargs) -> int:
    """The HTTP status of a refused opening handshake (fails if it is accepted)."""
    try:
        ws = open_ws(port, source, **kwargs)
    except websockets.exceptions.InvalidStatus as e:
        return e.response.status_code
    ws.close()
    raise AssertionError("the handshake was accepted")


def whoami(ws) -> dict:
    return request(ws, "whoami")


# --- 1. request rate (token bucket), in memory -----------------------------------------------------


def test_rate_limit_admits_the_burst_then_refuses_with_the_request_id():
    clock, session = in_memory(rate_limit=2, rate_burst=5)
    for i in range(5):
        assert send(session, _request(i))["result"]["circle"] == CIRCLE
    refused = send(session, _request("over"))
    assert refused["error"]["code"] == -32006 and refused["id"] == "over"
    assert refused["error"]["data"] == {"rate_limit": 2}
    clock.advance(0.5)  # one token back at 2 a second
    assert "result" in send(session, _request("one"))
    assert send(session, _request("two"))["error"]["code"] == -32006
    clock.advance(3600)  # saved up to the burst, no more
    assert all("result" in send(session, _request(i)) for i in range(5))
    assert send(session, _request(6))["error"]["code"] == -32006


def test_rate_limit_burst_defaults_to_twice_the_rate():
    _, session = in_memory(rate_limit=3)
    assert ["result" in send(session, _request(i)) for i in range(7)] == [True] * 6 + [False]


def test_rate_limit_a_batch_costs_its_length():
    clock, session = in_memory(rate_limit=1, rate_burst=5)
    batch = send(session, [_request(f"a{i}") for i in range(3)])
    assert sorted(r["id"] for r in batch) == ["a0", "a1", "a2"] and all("result" in r for r in batch)
    # 2 tokens left: a batch of 3 is refused whole, once, with id null, and spends nothing
    refused = send(session, [_request(f"b{i}") for i in range(3)])
    assert refused["error"]["code"] == -32006 and refused["id"] is None
    assert len(send(session, [_request("c0"), _request("c1")])) == 2
    assert send(session, _request("d"))["error"]["code"] == -32006
    clock.advance(3)
    assert len(send(session, [_request(f"e{i}") for i in range(3)])) == 3


def test_rate_limit_notifications_spend_tokens_and_get_nothing_when_over():
    _, session = in_memory(rate_limit=1, rate_burst=2)
    assert send(session, _request(None)) is None  # a notification within the limit: no reply
    assert send(session, _request(None)) is None
    assert send(session, _request(None)) is None  # over the limit: still nothing
    assert send(session, _request("r"))["error"]["code"] == -32006  # the two notifications spent it


def test_rate_limit_refusal_of_an_invalid_id_says_null():
    _, session = in_memory(rate_limit=1, rate_burst=1)
    send(session, _request(1))
    assert send(session, {"jsonrpc": "2.0", "method": "whoami", "id": [1]}) == {
        "jsonrpc": "2.0", "error": {"code": -32006, "message": "Too many requests: slow down",
                                    "data": {"rate_limit": 1}}, "id": None}


def test_rate_zero_is_unlimited():
    _, session = in_memory(rate_limit=0)
    assert all("result" in send(session, _request(i)) for i in range(5000))
    assert len(send(session, [_request(i) for i in range(100)])) == 100


# --- 8. outstanding nonces per connection, in memory -----------------------------------------------


def test_nonce_cap_per_connection_then_allowed_after_expiry():
    clock, session = in_memory(nonce_ttl=60)  # the default cap: 16
    nonces = [send(session, _request(i, "fetch_nonce"))["result"]["nonce"] for i in range(16)]
    assert len(set(nonces)) == 16
    refused = send(session, _request("17th", "fetch_nonce"))
    assert refused["error"]["code"] == -32006 and refused["id"] == "17th"
    clock.advance(30)
    assert send(session, _request("still", "fetch_nonce"))["error"]["code"] == -32006  # all 16 still live
    clock.advance(31)  # past the TTL: they are gone
    assert "nonce" in send(session, _request("again", "fetch_nonce"))["result"]
    # another connection has its own allowance
    _, other = in_memory(clock, nonce_ttl=60)
    assert "nonce" in send(other, _request(1, "fetch_nonce"))["result"]


def test_spending_a_nonce_frees_its_slot():
    _, session = in_memory(max_nonces_per_session=2)
    key = Key()
    nonce = send(session, _request(1, "fetch_nonce", {"pubkey": key.pubkey}))["result"]["nonce"]
    send(session, _request(2, "fetch_nonce"))
    assert send(session, _request(3, "fetch_nonce"))["error"]["code"] == -32006
    reply = send(session, _request(4, "authenticate", {"pubkey": key.pubkey, "signature": key.eth_sign(nonce)}))
    assert reply["result"]["authenticated"] is True
    assert "nonce" in send(session, _request(5, "fetch_nonce"))["result"]


# --- 2. connection limits over real sockets --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_total_connection_limit_refuses_503_and_releases_the_slot(start):
    service, port = await serve(start, max_connections=3, rate_limit=0)
    held = [await in_thread(open_ws, port) for _ in range(3)]
    try:
        assert await in_thread(refused_status, port) == 503
        assert await in_thread(refused_status, port, source="127.0.0.2") == 503  # in all, whoever asks
        assert (await in_thread(whoami, held[0]))["result"]["circle"] == CIRCLE  # the admitted are served
        await in_thread(held.pop().close)
        await eventually(lambda: service.factory.connections.open == 2)
        held.append(await in_thread(open_ws, port))  # the slot is free again
        assert (await in_thread(whoami, held[-1]))["result"]["circle"] == CIRCLE
        assert await in_thread(refused_status, port) == 503
        # refused handshakes and connections dropped without a close handshake free their slots too
        sock = held.pop().socket
        sock.shutdown(socket.SHUT_RDWR)
        await eventually(lambda: service.factory.connections.open == 2)
        held.append(await in_thread(open_ws, port))
    finally:
        for ws in held:
            await in_thread(ws.close)
    await eventually(lambda: service.factory.connections.open == 0)


@pytest_twisted.ensureDeferred
async def test_per_address_connection_limit(start):
    service, port = await serve(start, max_connections=0, max_connections_per_ip=2)
    # 127.0.0.2 is loopback too: a second client address without leaving the machine
    held = [await in_thread(open_ws, port) for _ in range(2)]
    try:
        assert await in_thread(refused_status, port) == 503
        held.append(await in_thread(open_ws, port, source="127.0.0.2"))  # another address has its own share
        held.append(await in_thread(open_ws, port, source="127.0.0.2"))
        assert await in_thread(refused_status, port, source="127.0.0.2") == 503
        await in_thread(held.pop(0).close)
        await eventually(lambda: service.factory.connections.by_peer.get("127.0.0.1") == 1)
        held.append(await in_thread(open_ws, port))
        assert await in_thread(refused_status, port) == 503
        for ws in held:
            assert (await in_thread(whoami, ws))["result"]["circle"] == CIRCLE
    finally:
        for ws in held:
            await in_thread(ws.close)
    await eventually(lambda: service.factory.connections.by_peer == {})


# --- 3. connections that never finish their HTTP request -------------------------------------------


def _open_silent(port: int, n: int) -> list:
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=60))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _answer_or_close(sock: socket.socket) -> bytes:
    """What the server sends before closing ``sock`` (b"" for a close without a word)."""
    sock.settimeout(60)
    answer = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return answer
            answer += data
    except ConnectionResetError:
        return answer


@pytest_twisted.ensureDeferred
async def test_pending_connections_per_address_are_capped_and_counted_back(start):
    """Connections are counted from accept, by address while they have not sent
    their request head; past the cap an address is refused 503, others are not."""
    service, port = await serve(start, max_pending_per_ip=5, handshake_timeout=60)
    silent = await in_thread(_open_silent, port, 8)
    try:
        await eventually(lambda: service.router.pending.get("127.0.0.1") == 5)
        refused = [await in_thread(_answer_or_close, sock) for sock in silent[5:]]
        assert all(answer.startswith(b"HTTP/1.1 503 ") for answer in refused), refused
        assert b"too many unfinished requests from this address" in refused[0]
        assert service.router.refused == 3
        exposition = service.gateway.metrics.exposition().decode()
        assert 'circles_connections_refused_total{reason="pending_per_ip"} 3.0' in exposition
        assert "circles_tcp_connections_open 5.0" in exposition
        # another address is not held back, nor is a whole request from this one
        ws = await in_thread(open_ws, port, "127.0.0.2")
        assert (await in_thread(whoami, ws))["result"]["circle"] == CIRCLE
        await in_thread(ws.close)
        silent[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await in_thread(_answer_or_close, silent[0])).startswith(b"HTTP/1.1 200 ")
        await eventually(lambda: service.router.pending.get("127.0.0.1") == 4)
        held = await in_thread(_open_silent, port, 1)  # its place is free again
        silent += held
        await eventually(lambda: service.router.pending.get("127.0.0.1") == 5)
    finally:
        for sock in silent:
            sock.close()
    # Every connection, whatever became of it, is counted back out.
    await eventually(lambda: service.router.pending == {} and service.accepts.open == 0)


# --- 6. allowed origins -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_allowed_origins(start):
    service, port = await serve(start, allowed_origins=("https://app.example",))
    for origin in ("https://evil.example", "http://app.example", "https://app.example.evil.example", "null"):
        assert await in_thread(refused_status, port, origin=origin) == 403, origin
    for origin in ("https://app.example", None):  # None: no Origin header, as non-browser clients send
        ws = await in_thread(open_ws, port, origin=origin)
        assert (await in_thread(whoami, ws))["result"]["circle"] == CIRCLE
        await in_thread(ws.close)
    await eventually(lambda: service.factory.connections.open == 0)  # refusals were never counted


@pytest.mark.parametrize("origin, allowed", [
    ("https://app.example", True), ("https://app.example:443", True), ("HTTPS://App.Example", True),
    ("https://app.example:8443", False), ("http://app.example", False), ("https://evil.example", False),
    ("https://app.example.evil.example", False), ("https://evil.example/https://app.example", False),
    ("https://a.example.com", True), ("https://a.b.example.com:443", True), ("https://example.com", False),
    ("https://a.example.com.evil", False), ("http://localhost:3000", True), ("http://localhost", False),
    ("null", False), ("not a url", False), ("https://", False), ("", True), (None, True),
])
def test_origin_policy(origin, allowed):
    from circles.server.access.limits import OriginPolicy
    policy = OriginPolicy(("https://app.example", "https://*.example.com", "http://localhost:3000"))
    assert policy.allows(origin) is allowed
    assert OriginPolicy(("*",)).allows(origin)
    assert OriginPolicy(("null",)).allows("null")


#: The rule of --allowed-origins (circles.server.access.limits.ORIGIN_RULE), at its edges.
EDGE_PATTERNS = ("https://app.example", "https://*.example.com", "http://localhost:*", "http://[::1]:3000",
                 "chrome-extension://abcdef")


@pytest.mark.parametrize("origin, allowed", [
    # scheme: must be the pattern's
    ("https://app.example", True), ("http://app.example", False), ("wss://app.example", False),
    # port: one left out is the scheme's default, on either side; :* is any port, the default included
    ("https://app.example:443", True), ("https://app.example:8443", False), ("https://app.example:80", False),
    ("http://localhost", True), ("http://localhost:1", True), ("http://localhost:65535", True),
    ("https://localhost:3000", False), ("http://localhost.evil.example:3000", False),
    ("chrome-extension://abcdef", True), ("chrome-extension://abcdef:443", False),  # no default port
    # subdomain depth: any below the domain, never the domain itself, nothing that only ends like it
    ("https://a.example.com", True), ("https://a.b.c.example.com", True), ("https://a.example.com:443", True),
    ("https://example.com", False), ("https://aexample.com", False), ("https://a.example.com.evil", False),
    ("https://a.example.com:8443", False), ("http://a.example.com", False),
    # null: only when listed by name
    ("null", False), ("NULL", False),
    # IPv6 literals, as browsers send them
    ("http://[::1]:3000", True), ("http://[::1]:3001", False), ("http://[::2]:3000", False),
    # not an origin (a browser sends none of these; a glob matched some): nothing matches
    ("https://app.example/", False), ("https://app.example/x", False), ("https://user@app.example", False),
    ("https://*.example.com", False), ("https://app.example:*", False), ("https://app.example:99999", False),
    ("https://app.example:", False), ("app.example", False), ("https://app.example.", False),
])
def test_origin_rule_at_its_edges(origin, allowed):
    from circles.server.access.limits import OriginPolicy
    assert OriginPolicy(EDGE_PATTERNS).allows(origin) is allowed


def test_null_is_allowed_by_name_and_by_star_only():
    from circles.server.access.limits import OriginPolicy
    assert OriginPolicy(("null",)).allows("null") and OriginPolicy(("*",)).allows("null")
    assert not OriginPolicy(("null",)).allows("https://app.example")
    assert not OriginPolicy(("https://*.example.com", "http://localhost:*")).allows("null")


@pytest.mark.parametrize("pattern, why", [
    ("https://app*.example", "first label"),  # a glob let https://app.evil.example in
    ("https://*example.com", "first label"),  # ... and https://evilexample.com
    ("https://*.*.example.com", "first label"), ("http://*", "first label"),
    ("*.example.com", "names its scheme"), ("*://app.example", "names its scheme"),  # any scheme, as a glob
    ("app.example", "names its scheme"),
    ("https://app.example/", "no path"), ("https://app.example/app", "no path"),
    ("https://user@app.example", "no path"),
    ("https://app.example:0", "bad port"), ("https://app.example:70000", "bad port"),
    ("https://app.example:8x", "bad port"), ("https://exämple.com", "punycode"), ("https://", "bad host"),
])
def test_origin_patterns_outside_the_rule_are_refused(pattern, why):
    from circles.server.access.limits import OriginPolicy
    with pytest.raises(ValueError, match=why):
        OriginPolicy((pattern,))
    with pytest.raises(ValueError, match=why):
        Config(allowed_origins=(pattern,))
    with pytest.raises(usage.UsageError, match=f"origin pattern .*{why}"):
        server_tap.Options().parseOptions(["--allowed-origins", f"https://ok.example,{pattern}"])


def test_allowed_origins_help_states_the_rule():
    text = str(server_tap.Options())
    for clause in ("80 for http, 443 for https", ":* is any port", "a.b.example.com", "not example.com itself",
                   "null", "no path"):
        assert clause in " ".join(text.split()), clause


# --- 11. replies over the message size limit, over real sockets -------------------------


class _QuotesRunner:
    """A script backend whose output is as many '"' as the script says: a play chooses its size."""

    def run(self, request):
        from twisted.internet.defer import succeed

        return succeed('"' * int(request.script))


def _send_and_receive(ws, message) -> tuple[object, object]:
    """(the parsed reply, None), or (None, the close frame) when the server closes instead."""
    ws.send(json.dumps(message))
    try:
        return json.loads(ws.recv(timeout=60)), None
    except websockets.exceptions.ConnectionClosed as closed:
        return None, closed.rcvd


@pytest_twisted.ensureDeferred
async def test_replies_over_the_limit_are_errors_or_1009_never_a_drop(start):
    from zope.interface import directlyProvides

    from circles.backend.scripts import IScriptRunner

    runner = _QuotesRunner()
    directlyProvides(runner, IScriptRunner)
    limit = 64 * 1024
    config = Config(listen=(LOOPBACK,), circles=[CIRCLE], max_message_size=limit, rate_limit=0)
    service = start(CirclesService(config, reactor=reactor, scripts=runner))
    [listening] = await service.when_listening()
    port = listening.getHost().port
    ws = await in_thread(open_ws, port, max_size=None)
    try:
        # A play whose output fits as text but not once JSON-escaped: answered at once.
        script = str(limit - 1000)
        reply, _ = await in_thread(_send_and_receive, ws, _request(1, "play", {"script": script}))
        assert reply["id"] == 1 and reply["error"]["code"] == -32007
        assert reply["error"]["data"]["limit"] == limit and reply["error"]["data"]["size"] > limit
        # An attack that once worked: a batch of rpc.discover with long ids. Answered within the limit.
        batch = [_request(f"{i}-" + "i" * 300, "rpc.discover") for i in range(30)]
        reply, _ = await in_thread(_send_and_receive, ws, batch)
        assert len(json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()) <= limit
        assert [r["id"] for r in reply] == [r["id"] for r in batch]
        assert any("result" in r for r in reply) and any(r.get("error", {}).get("code") == -32007 for r in reply)
        assert (await in_thread(whoami, ws))["result"]["circle"] == CIRCLE
        # An id too long to echo even in an error: a proper close, 1009.
        reply, close = await in_thread(_send_and_receive, ws, _request("i" * (limit - 100), "rpc.discover"))
        assert reply is None and close is not None and close.code == 1009
    finally:
        await in_thread(ws.close)
