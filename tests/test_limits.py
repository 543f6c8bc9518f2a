"""Every limit of issue 8 with a test that fails when the limit does not hold.

In memory (a ``Clock``) where only arithmetic is at stake: the request rate and the nonce cap.
Over real loopback sockets against an in-process ``CirclesService`` for everything the network
decides: connection counts, handshake and idle timeouts, pings, origins, backpressure. As an
operator runs it (``twistd -n circles`` + ``circles-worker`` processes, SIGTERM) for shutdown.

Blocking clients (the ``websockets`` sync client, raw sockets) run in threads so the reactor,
which runs the server in this same process, keeps turning. Waits poll with a deadline; nothing
asserts how fast anything happens, only that it happens within a generous bound.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import selectors
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
import websockets
from twisted.internet import reactor, threads
from twisted.internet.task import Clock
from twisted.python import usage
from websockets.sync.client import connect

from circles import CirclesService, Config, server_tap
from circles.server.gateway import Gateway

from .inmemory import NoScriptBackend, open_session, replied
from .play_client import eventually, new_key, pk, sleep
from .support import Key, request, twistd

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


async def serve(start, **config) -> "tuple[CirclesService, int]":
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


def raw_upgrade(port: int, *, rcvbuf: int = 0, sndbuf: int = 0, extra: str = "") -> socket.socket:
    """A WebSocket opened by hand (blocking): the HTTP upgrade is written here, and nothing
    else happens unless the caller does it, not even answering pings."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /{CIRCLE} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"{extra}\r\n").encode("ascii"))
    response = b""
    while not response.endswith(b"\r\n\r\n"):  # byte by byte: not a byte of the first frame
        byte = sock.recv(1)
        assert byte, f"closed during the handshake: {response!r}"
        response += byte
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame (clients must mask)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


class Frames:
    """Parses the server's (unmasked, unfragmented) frames out of a byte stream."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list:
        self._buffer += data
        frames = []
        while len(self._buffer) >= 2:
            opcode, length = self._buffer[0] & 0x0F, self._buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(self._buffer) < 4:
                    break
                length, start = struct.unpack("!H", self._buffer[2:4])[0], 4
            elif length == 127:
                if len(self._buffer) < 10:
                    break
                length, start = struct.unpack("!Q", self._buffer[2:10])[0], 10
            if len(self._buffer) < start + length:
                break
            frames.append((opcode, self._buffer[start:start + length]))
            self._buffer = self._buffer[start + length:]
        return frames


def closed_by_peer(sock: socket.socket, timeout: float = 60) -> bool:
    """Read (and discard) until the peer closes; False if it is still open after ``timeout``."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


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


def _all_closed_by_server(socks: list, timeout: float) -> int:
    """Wait until the server has closed every socket; return how many it left open."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_ = len(socks)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            try:
                data = key.fileobj.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except BlockingIOError:
                continue
            assert not data, f"a silent client was sent {data!r}"
            selector.unregister(key.fileobj)
            open_ -= 1
    selector.close()
    return open_


@pytest_twisted.ensureDeferred
async def test_a_thousand_silent_connections_are_cut_off(start):
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * n + 256  # both ends live in this process
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    # The deadline alone: past --max-pending-per-ip (its own test) a silent crowd from one
    # address is refused with a 503 before the deadline, when it opens fast enough.
    service, port = await serve(start, handshake_timeout=1, max_pending_per_ip=0)
    socks = await in_thread(_open_silent, port, n)
    try:
        assert await in_thread(_all_closed_by_server, socks, 120) == 0
    finally:
        for sock in socks:
            sock.close()
    # and the server still serves
    ws = await in_thread(open_ws, port)
    assert (await in_thread(whoami, ws))["result"]["circle"] == CIRCLE
    await in_thread(ws.close)


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
    """Issue 12: connections are counted from accept, by address while they have not sent
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


def _partial_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET /{CIRCLE} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n".encode())
    return sock


def _trickle(port: int, seconds: float) -> bool:
    """Send a request's headers a byte at a time, never finishing; True if the server closed it."""
    sock = _partial_request(port)
    try:
        sock.sendall(b"X-Slow: ")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                return True
            sock.settimeout(0.2)
            try:
                if not sock.recv(4096):
                    return True
            except socket.timeout:
                pass
            except ConnectionResetError:
                return True
        return False
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_a_partial_http_request_is_closed(start):
    service, port = await serve(start, handshake_timeout=1)
    sock = await in_thread(_partial_request, port)
    try:
        assert await in_thread(closed_by_peer, sock, 60)
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_a_request_trickled_a_byte_at_a_time_is_closed(start):
    """--handshake-timeout bounds the whole request, not the silence between two bytes: a
    client sending one header byte every 0.2 s must not hold a connection forever."""
    service, port = await serve(start, handshake_timeout=1)
    assert await in_thread(_trickle, port, 30)


@pytest_twisted.ensureDeferred
async def test_an_open_websocket_outlives_the_handshake_timeout(start):
    service, port = await serve(start, handshake_timeout=0.5, idle_timeout=0, ping_interval=0)
    ws = await in_thread(open_ws, port)
    try:
        await sleep(2)
        assert (await in_thread(whoami, ws))["result"]["circle"] == CIRCLE
        assert len(service.factory.open_connections) == 1
    finally:
        await in_thread(ws.close)


# --- 4. idle timeout --------------------------------------------------------------------------------


def _close_of(ws) -> "websockets.frames.Close":
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        ws.recv(timeout=60)
    return closed.value.rcvd


def _chatty(ws, seconds: float, every: float) -> int:
    deadline = time.monotonic() + seconds
    calls = 0
    while time.monotonic() < deadline:
        assert whoami(ws)["result"]["circle"] == CIRCLE
        calls += 1
        time.sleep(every)
    return calls


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed_a_chatty_one_is_not(start):
    service, port = await serve(start, idle_timeout=2, ping_interval=0)
    began = time.monotonic()  # before the server can start the idle connection's timer
    idle, chatty = await in_thread(open_ws, port), await in_thread(open_ws, port)
    try:
        chatter = in_thread(_chatty, chatty, 5, 0.1)
        close = await in_thread(_close_of, idle)
        assert close.code == 1000 and "idle" in close.reason
        assert time.monotonic() - began >= 1.9  # not closed early (a lower bound only: load delays)
        assert await chatter > 5
        assert (await in_thread(whoami, chatty))["result"]["circle"] == CIRCLE  # still open past 2x idle
    finally:
        await in_thread(chatty.close)
        await in_thread(idle.close)


# --- 5. auto-ping -----------------------------------------------------------------------------------


def _ignore_pings(sock: socket.socket, timeout: float) -> list:
    """Read frames without ever answering, until the server drops us; the opcodes seen."""
    frames, opcodes = Frames(), []
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return opcodes + ["eof"]
            opcodes += [opcode for opcode, _ in frames.feed(data)]
    except ConnectionResetError:
        return opcodes + ["eof"]
    except socket.timeout:
        pass
    return opcodes


@pytest_twisted.ensureDeferred
async def test_a_peer_that_never_answers_pings_is_dropped(start):
    service, port = await serve(start, ping_interval=0.5, ping_timeout=0.5, idle_timeout=0)
    mute = await in_thread(raw_upgrade, port)
    polite = await in_thread(open_ws, port)  # the websockets library answers pings itself
    try:
        seen = await in_thread(_ignore_pings, mute, 60)
        assert seen[-1] == "eof", seen
        assert 0x9 in seen  # it was pinged, did not answer, and was dropped for it
        assert seen.count(0x9) <= 2  # dropped at the first unanswered ping's timeout (or about)
        await sleep(2)  # several ping intervals
        assert (await in_thread(whoami, polite))["result"]["circle"] == CIRCLE
        assert len(service.factory.open_connections) == 1
    finally:
        mute.close()
        await in_thread(polite.close)


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


#: Issue 23: the rule of --allowed-origins (circles.server.access.limits.ORIGIN_RULE), at its edges.
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


# --- 7. a reader that stalls: backpressure ----------------------------------------------------------


def buffered_bytes(transport) -> int:
    """Bytes the server has written to ``transport`` that the kernel has not taken yet.

    Twisted has no public API for this. ``FileDescriptor`` keeps them in ``dataBuffer`` (from
    ``offset``) and ``_tempDataBuffer`` (``_tempDataLen`` bytes): private, so the least fragile
    reading is these three names, checked to exist so that a Twisted that renames them fails
    this test loudly instead of measuring 0. The public observable that goes with it is
    ``reactor.getReaders()``: a paused transport is not among them.
    """
    for name in ("dataBuffer", "offset", "_tempDataLen"):
        assert hasattr(transport, name), f"Twisted's FileDescriptor has no {name} any more"
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_is_no_longer_read(start):
    service, port = await serve(start, rate_limit=0, idle_timeout=0, ping_interval=0)
    slow = await in_thread(raw_upgrade, port, rcvbuf=4096, sndbuf=4096)
    [protocol] = await eventually(lambda: list(service.factory.open_connections))
    server_side = protocol.transport
    assert server_side in reactor.getReaders()
    slow.setblocking(False)

    sent = 0  # requests sent, whole frames only
    pending = b""
    deadline = time.monotonic() + 120
    # Pipeline requests and never read, until every buffer between us is full: our sends have
    # blocked for a while and the server is not reading (it may pause and resume a few times
    # before, while the kernel's buffers grow).
    blocked_since = None
    while True:
        assert time.monotonic() < deadline and sent < 500_000, "the server never stopped reading"
        if not pending:
            pending = b"".join(masked_frame(json.dumps(_request(sent + i)).encode()) for i in range(500))
            sent += 500
        try:
            pending = pending[slow.send(pending):]
            blocked_since = None
        except BlockingIOError:
            if blocked_since is None:
                blocked_since = time.monotonic()
            elif time.monotonic() - blocked_since > 1 and server_side not in reactor.getReaders():
                break
        await sleep(0.001)
    most = buffered_bytes(server_side)
    assert most < 2 * 1024 * 1024

    # Stalled, it stays stalled and bounded; everyone else is served meanwhile.
    other = await in_thread(open_ws, port)
    for _ in range(3):
        assert (await in_thread(whoami, other))["result"]["circle"] == CIRCLE
        assert server_side not in reactor.getReaders()
        most = max(most, buffered_bytes(server_side))
        assert most < 2 * 1024 * 1024
        await sleep(0.2)
    await in_thread(other.close)

    # Once the client reads, the server resumes and answers every request.
    frames, answered = Frames(), set()
    deadline = time.monotonic() + 120
    while len(answered) < sent:
        assert time.monotonic() < deadline, f"{len(answered)} of {sent} answered"
        if pending:
            try:
                pending = pending[slow.send(pending):]
            except BlockingIOError:
                pass
        try:
            data = slow.recv(1 << 20)
        except BlockingIOError:
            await sleep(0.001)
            continue
        assert data, "the server closed the connection"
        for opcode, payload in frames.feed(data):
            assert opcode == 0x1, (opcode, payload)
            reply = json.loads(payload)
            assert reply["result"]["circle"] == CIRCLE
            answered.add(reply["id"])
        await sleep(0)
    assert answered == set(range(sent))
    await eventually(lambda: server_side in reactor.getReaders())  # reading again
    slow.close()


# --- 11. replies over the message size limit (issue 12), over real sockets -------------------------


class _QuotesRunner:
    """A script backend whose output is as many '"' as the script says: a play chooses its size."""

    def run(self, request):
        from twisted.internet.defer import succeed

        return succeed('"' * int(request.script))


def _send_and_receive(ws, message) -> "tuple[object, object]":
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
        # The attack of issue 12: a batch of rpc.discover with long ids. Answered within the limit.
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


# --- 10. graceful shutdown, as an operator does it --------------------------------------------------


def _redis_pids(state_dir: Path) -> list:
    """Processes whose command line names the state directory's Redis socket."""
    socket_path = str(state_dir / "redis.sock")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if socket_path in cmdline and "redis-server" in cmdline:
                pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stopped_cleanly(returncode, server) -> None:
    """twistd, after a clean shutdown on a signal, re-raises that signal so its parent sees
    the conventional status (systemd counts SIGTERM as a clean exit): -SIGTERM here, or 0."""
    assert returncode in (0, -signal.SIGTERM), server.output
    assert "Main loop terminated." in server.output and "Server Shut Down." in server.output, server.output
    assert "Traceback" not in server.output, server.output


def _wait(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {predicate}"
        time.sleep(0.05)


SHELL_WORKER = ["--exec", "sh {script_file}"]


def _shutdown_with_a_play_in_flight(tmp_path: Path, grace: float, script: str):
    """Start a server and a worker, put ``script`` in flight, SIGTERM the server. Yields the
    client's messages (replies, then the close) and how the server process ended."""
    circle = Key()
    started = tmp_path / "started"
    with twistd(["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1",
                 "--shutdown-grace", str(grace)], tmp_path) as server, \
            twistd(["-k", circle.pubkey, *SHELL_WORKER], tmp_path, plugin="circles-worker") as worker:
        port = server.wait_listening()
        server.wait_for("connected to Redis")
        worker.wait_for("waiting for tasks")
        pids = _redis_pids(tmp_path / "circles-state")
        logged = re.search(r"started a private redis-server \(pid (\d+)\)", server.output)
        assert pids and logged and int(logged.group(1)) in pids, server.output
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30, ping_interval=None) as ws:
            ws.send(json.dumps(_request("p", "play", {"script": f"touch {started}; {script}", "timeout": 60})))
            _wait(started.exists)
            server.proc.terminate()  # SIGTERM
            replies = []
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                while True:
                    replies.append(json.loads(ws.recv(timeout=grace + 60)))
        try:  # within the grace period and a generous margin
            returncode = server.proc.wait(grace + 30)
        except subprocess.TimeoutExpired:
            returncode = None
        return replies, closed.value.rcvd, returncode, pids, server


def test_sigterm_lets_the_play_in_flight_finish_then_1001_and_stops_redis(tmp_path):
    replies, close, returncode, pids, server = _shutdown_with_a_play_in_flight(tmp_path, 10, "sleep 2; echo done")
    assert replies == [{"jsonrpc": "2.0", "result": {"output": "done"}, "id": "p"}]
    assert close is not None and close.code == 1001, close
    _stopped_cleanly(returncode, server)
    _wait(lambda: not any(_alive(pid) for pid in pids), 30)
    assert not (tmp_path / "circles-state" / "redis.sock").exists()


def test_sigterm_past_the_grace_answers_minus_32004_then_1001(tmp_path):
    replies, close, returncode, pids, server = _shutdown_with_a_play_in_flight(tmp_path, 1, "sleep 30; echo late")
    assert len(replies) == 1 and replies[0]["id"] == "p", replies
    assert replies[0]["error"]["code"] == -32004, replies
    assert close is not None and close.code == 1001, close
    _stopped_cleanly(returncode, server)
    _wait(lambda: not any(_alive(pid) for pid in pids), 30)


def test_twistd_rate_limit_option_reaches_the_connection(tmp_path):
    circle = Key()
    with twistd(["-k", circle.pubkey, "--port", "0", "--interface", "127.0.0.1",
                 "--rate-limit", "0.001", "--rate-burst", "2", "--max-batch", "3"], tmp_path) as server:
        port = server.wait_listening()
        with connect(f"ws://127.0.0.1:{port}/{circle.pubkey}", open_timeout=30) as ws:
            ws.send(json.dumps([_request(i) for i in range(4)]))
            assert json.loads(ws.recv(timeout=30))["error"]["code"] == -32006  # over --max-batch
            assert request(ws, "whoami", id_=1)["result"]["circle"] == circle.pubkey
            assert request(ws, "whoami", id_=2)["result"]["circle"] == circle.pubkey
            reply = request(ws, "whoami", id_=3)
            assert reply["error"]["code"] == -32006 and reply["id"] == 3
