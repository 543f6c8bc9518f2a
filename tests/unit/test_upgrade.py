"""The first-bytes router: circle upgrades straight to Autobahn, everything else to the Site."""

from __future__ import annotations

import json
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from circles import CirclesService, Config
from circles.server.http.upgrade import MAX_HEAD, MAX_LINE, is_circle_upgrade

from ..inmemory import NoScriptBackend
from ..support import Key

CIRCLE = Key().pubkey
UPGRADE = (f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


@pytest.mark.parametrize("head, expected", [
    (UPGRADE[:-4], True),
    (UPGRADE[:-4].replace(b"Upgrade: websocket", b"UPGRADE:  WebSocket "), True),
    (UPGRADE[:-4].replace(f"/{CIRCLE}".encode(), f"/{CIRCLE}?pubkey=x&sig=y&nonce=z".encode()), True),
    (UPGRADE[:-4].replace(b"Upgrade: websocket", b"Upgrade: h2c"), False),
    (UPGRADE[:-4].replace(b"Upgrade: websocket\r\n", b""), False),
    (UPGRADE[:-4].replace(b"GET ", b"POST "), False),
    (UPGRADE[:-4].replace(f"/{CIRCLE}".encode(), b"/webhooks/stripe/x"), False),
    (UPGRADE[:-4].replace(f"/{CIRCLE}".encode(), f"/{CIRCLE}/extra".encode()), False),
    (b"garbage", False),
])
def test_is_circle_upgrade(head, expected):
    assert is_circle_upgrade(head) is expected


def _exchange(port: int, chunks: list, pause: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        for chunk in chunks:
            s.sendall(chunk)
            time.sleep(pause)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = s.recv(65536)
            if not data:
                break
            answer += data
        return answer


@pytest_twisted.async_yield_fixture
async def port():
    service = CirclesService(Config(circles=[CIRCLE], listen=("tcp:0:interface=127.0.0.1",), handshake_timeout=5),
                             reactor=reactor, scripts=NoScriptBackend())
    service.startService()
    [listening] = await service.when_listening()
    yield listening.getHost().port
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_upgrade_sent_in_pieces_is_routed_whole(port):
    answer = await threads.deferToThread(_exchange, port, [UPGRADE[:10], UPGRADE[10:50], UPGRADE[50:]], 0.05)
    assert answer.startswith(b"HTTP/1.1 101 ")


@pytest_twisted.ensureDeferred
async def test_other_requests_reach_the_site(port):
    answer = await threads.deferToThread(_exchange, port, [b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert answer.startswith(b"HTTP/1.1 200 ")
    # named as the upgrade's 101 names it, not Twisted with its version (TwistedWeb/26.10.0)
    assert b"\r\nServer: circles\r\n" in answer and b"Twisted" not in answer
    # A circle path without the upgrade is the Site's too: the WebSocket resource asks for one.
    answer = await threads.deferToThread(_exchange, port, [f"GET /{CIRCLE} HTTP/1.1\r\nHost: x\r\n\r\n".encode()])
    assert answer.startswith(b"HTTP/1.1 426 ")


@pytest_twisted.ensureDeferred
async def test_oversized_head_is_refused_431(port):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n"
    answer = await threads.deferToThread(_exchange, port, [head])
    assert answer.startswith(b"HTTP/1.1 431 ")
    # sent in pieces, the head never ending: the same answer once it passes the limit
    answer = await threads.deferToThread(_exchange, port, [head[:1000], head[1000:MAX_HEAD + 100]], 0.05)
    assert answer.startswith(b"HTTP/1.1 431 ")


LONG_LINE = b"GET /" + b"a" * (MAX_LINE + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("chunks", [
    [LONG_LINE],  # whole, its end in the same read: once routed to the Site, which closed without a word
    [LONG_LINE[:MAX_LINE // 2], LONG_LINE[MAX_LINE // 2:]],
    [LONG_LINE[:MAX_LINE + 5]],  # never finished
], ids=["whole", "in-pieces", "unfinished"])
@pytest_twisted.ensureDeferred
async def test_request_line_over_16k_is_refused_414(port, chunks):
    """A request line over 16 KiB got an empty reply."""
    answer = await threads.deferToThread(_exchange, port, chunks, 0.05)
    assert answer.startswith(b"HTTP/1.1 414 ")
    # and a line just under the limit (with its headers, under the head's) is still served
    path = b"/health?" + b"a" * (MAX_LINE - 100)
    answer = await threads.deferToThread(_exchange, port, [b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path])
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_pending_connections_count_against_the_address_or_its_64():
    """Every host with IPv6 holds a /64: counted by address, the pending cap was no cap for it."""
    from twisted.internet.address import IPv4Address, IPv6Address
    from twisted.internet.protocol import ServerFactory
    from twisted.internet.task import Clock

    from circles.server.http.upgrade import UpgradeRouter, _FirstBytes

    router = UpgradeRouter(ServerFactory(), ServerFactory(), Clock(), timeout=10, max_pending_per_peer=1)
    built = [router.buildProtocol(address) for address in (
        IPv6Address("TCP", "2001:db8:1:2::1", 1), IPv6Address("TCP", "2001:db8:1:2::2", 1),  # one /64
        IPv6Address("TCP", "2001:db8:1:3::1", 1),  # another
        IPv4Address("TCP", "203.0.113.7", 1), IPv6Address("TCP", "::ffff:203.0.113.8", 1),  # two IPv4 clients
    )]
    assert [isinstance(p, _FirstBytes) for p in built] == [True, False, True, True, True]


def _answer_to(port: int, data: bytes) -> bytes:
    """What the server answers ``data`` with, read until it closes (b"" if it never answers and
    drops the connection; a generous timeout, not a timing assertion)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        answer = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        return answer


BARE_LF_HEADS = {
    "plain": b"GET / HTTP/1.1\nHost: x\n\n",
    "health": b"GET /health HTTP/1.1\nHost: x\n\n",
    "upgrade": UPGRADE.replace(b"\r\n", b"\n"),
    # every line but one ends in CRLF: the head ends, but one of its lines hides another header
    "mixed": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: 1\nTransfer-Encoding: chunked\r\n\r\n",
    "mixed-upgrade": UPGRADE.replace(b"Connection: Upgrade\r\n", b"Connection: Upgrade\n"),
    "bare-lf-then-crlf-end": b"GET /health HTTP/1.1\nHost: x\n\r\n",
}


@pytest.mark.parametrize("head", BARE_LF_HEADS.values(), ids=BARE_LF_HEADS.keys())
@pytest_twisted.ensureDeferred
async def test_bare_lf_head_is_answered_400_at_once(port, head):
    """A head whose lines end in a bare LF got no answer until the header timeout.
    It is refused at once (RFC 9112 2.2 lets a server refuse it; accepting it where a proxy in
    front does not is how requests are smuggled), for a plain request and an upgrade alike."""
    answer = await threads.deferToThread(_answer_to, port, head)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"bare LF" in answer and b"content-length: " in answer.lower(), answer


@pytest_twisted.ensureDeferred
async def test_bare_lf_in_a_later_request_of_the_connection_is_answered_400(port):
    """The Site's own parser (keep-alive: the router has handed the connection over) too."""
    answer = await threads.deferToThread(
        _answer_to, port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\nHost: x\n\n")
    first, _, second = answer.partition(b"HTTP/1.1 400 ")
    assert first.startswith(b"HTTP/1.1 200 ") and b"bare LF" in second, answer


@pytest_twisted.ensureDeferred
async def test_bare_lf_in_a_body_is_data(port):
    """Only the head's lines are held to CRLF: a body is bytes."""
    body = b"a\nb\n\nc"
    answer = await threads.deferToThread(
        _exchange, port, [b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)])
    assert answer.startswith(b"HTTP/1.1 405 "), answer


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_with_crlf_are_all_answered(port):
    """The parser replays pipelined requests into itself: whole CRLF lines are no bare LF."""
    body = b"x\ny"
    requests = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 3
                + b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n" + body
                + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await threads.deferToThread(_answer_to, port, requests)
    statuses = [part[:3] for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [b"200", b"200", b"200", b"405", b"200"], answer


def _whole_answer(port: int, request: bytes) -> tuple[bytes, dict, bytes]:
    """Send ``request``, read until the server closes: (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}
    return status, headers, body


@pytest_twisted.ensureDeferred
async def test_a_refused_upgrade_says_why_in_a_json_body(port):
    """A 426 (a plain GET on a circle) had an empty body, as had every refused upgrade."""
    status, headers, body = await threads.deferToThread(
        _whole_answer, port, f"GET /{CIRCLE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == b"HTTP/1.1 426 Upgrade Required"
    assert (headers[b"upgrade"], headers[b"content-type"]) == (b"websocket", b"application/json")
    assert int(headers[b"content-length"]) == len(body)
    assert json.loads(body) == {"error": "this is a circle's WebSocket: connect with a WebSocket client "
                                         "(ws:// or wss://), not a plain HTTP request"}
    unserved = Key().pubkey
    status, headers, body = await threads.deferToThread(_whole_answer, port, UPGRADE.replace(CIRCLE.encode(),
                                                                                            unserved.encode()))
    assert (status, json.loads(body)) == (b"HTTP/1.1 404 No such circle", {"error": "No such circle"})
    assert int(headers[b"content-length"]) == len(body)
