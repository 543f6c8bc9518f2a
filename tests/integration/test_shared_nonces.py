"""Nonces every process sees: ``GET /auth/nonce`` on one server process, the WebSocket
with ``?pubkey&sig&nonce`` on any other, single use across all of them; Redis down or full is a
clear 503. Against real redis-servers and a real ``--processes 2`` server."""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.request

import psutil
import pytest
import pytest_twisted
import websockets
from twisted.internet import reactor, threads
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from websockets.sync.client import connect

from circles.backend.redis_url import parse_redis_url
from circles.backend.scripts import BackendFull, BackendUnavailable
from circles.common.signatures import AuthenticationFailed
from circles.server.access.nonces import NONCE_BYTES, TooManyNonces, TooManyNoncesForOwner
from circles.server.access.redis_nonces import RedisNonceStore, nonce_key
from devtools.redis_server import REDIS_SERVER

from ..play_client import eventually
from ..support import Key, request, twistd
from .test_play_ws import CIRCLE, serve

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def _fetch(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.load(e)


def _whoami(url: str) -> dict:
    with connect(url, open_timeout=30) as ws:
        return request(ws, "whoami")["result"]


def _refused(url: str) -> tuple[int, str]:
    try:
        with connect(url, open_timeout=30):
            return 101, ""
    except websockets.exceptions.InvalidStatus as e:
        return e.response.status_code, e.response.reason_phrase


# --- the issue's test: a real --processes 2 server ------------------------------------------


def _served_by(processes: list, port: int) -> list:
    """How many established connections on ``port`` each process holds."""
    return [sum(1 for c in p.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
            for p in processes]


def _two_processes(server) -> tuple[int, list]:
    """The port of a ``--processes 2`` server once both serve, and its two server processes."""
    port = server.wait_listening()
    server.wait_for("started server process 2")
    deadline = time.monotonic() + 60
    while server.output.count("connected to Redis") < 2:
        assert time.monotonic() < deadline, server.output
        time.sleep(0.1)
    parent = psutil.Process(server.proc.pid)
    processes = [parent, *(c for c in parent.children() if "redis-server" not in " ".join(c.cmdline()))]
    assert len(processes) == 2
    return port, processes


def _both_held(held: list) -> bool:
    """Each process held one of the WebSockets (``held``: connections per process, per WebSocket).
    Connections are made until then: on a busy machine the process that comes first may not wake
    within the 10 ms the other leaves it, and the other takes the connection."""
    return all(any(h[i] for h in held) for i in range(2))


def test_an_http_nonce_authenticates_a_websocket_on_any_process(tmp_path):
    """Before: 14 of 20 URL authentications failed with 2 processes (the nonce was in the memory
    of whichever process answered GET /auth/nonce, the WebSocket often landed on the other)."""
    circle, user = Key(), Key()
    with twistd(["--auth", "-k", circle.pubkey, "--processes", "2", "--port", "0", "--interface", "127.0.0.1"],
                tmp_path) as server:
        port, processes = _two_processes(server)
        base = f"127.0.0.1:{port}"
        results, held, urls = [], [], []
        while len(results) < 20 or not _both_held(held):
            assert len(results) < 200, held
            status, _, body = _fetch(f"http://{base}/auth/nonce?public_key={user.pubkey}")
            assert status == 200, body
            url = (f"ws://{base}/{circle.pubkey}?pubkey={user.pubkey}&sig={user.eth_sign(body['nonce'])}"
                   f"&nonce={body['nonce']}")
            urls.append(url)
            with connect(url, open_timeout=30) as ws:
                held.append(_served_by(processes, port))
                results.append(request(ws, "whoami")["result"])
        assert results == [{"circle": circle.pubkey, "authenticated": True, "pubkey": user.pubkey}] * len(results)
        # Single use across the processes: no URL opens a second time, wherever it lands.
        assert [_refused(url)[0] for url in urls[:6]] == [401] * 6
    assert "Traceback" not in server.output


def _authenticate(url: str, params: dict, processes: list, port: int) -> tuple[dict, dict, list]:
    """authenticate with ``params`` on a fresh WebSocket to ``url``: (its reply, whoami's after
    it, the connections each process holds meanwhile)."""
    with connect(url, open_timeout=30) as ws:
        held = _served_by(processes, port)
        reply = request(ws, "authenticate", params)
        return reply, request(ws, "whoami", id_=2)["result"], held


def test_an_http_nonce_authenticates_by_the_method_on_any_process(tmp_path):
    """A nonce is a nonce wherever it was fetched: 20 (or more, until both processes held one)
    from GET /auth/nonce, each used by the authenticate method on a fresh WebSocket, which lands
    on either process: every one (before, none: the method knew only its session's nonces).
    Single use across the processes; and a session's nonce stays bound to its session: a URL
    elsewhere is refused 401."""
    circle, user = Key(), Key()
    with twistd(["--auth", "-k", circle.pubkey, "--processes", "2", "--port", "0", "--interface", "127.0.0.1"],
                tmp_path) as server:
        port, processes = _two_processes(server)
        base = f"127.0.0.1:{port}"
        url = f"ws://{base}/{circle.pubkey}"
        replies, whoamis, held, used = [], [], [], []
        while len(replies) < 20 or not _both_held(held):
            assert len(replies) < 200, held
            status, _, body = _fetch(f"http://{base}/auth/nonce?public_key={user.pubkey}")
            assert status == 200, body
            params = {"pubkey": user.pubkey, "signature": user.eth_sign(body["nonce"]), "nonce": body["nonce"]}
            used.append(params)
            reply, whoami, where = _authenticate(url, params, processes, port)
            replies.append(reply.get("result", reply))
            whoamis.append(whoami)
            held.append(where)
        assert replies == [{"authenticated": True, "pubkey": user.pubkey}] * len(replies)
        assert whoamis == [{"circle": circle.pubkey, "authenticated": True, "pubkey": user.pubkey}] * len(replies)
        # Single use across the processes: no nonce authenticates a second time, wherever it lands.
        for params in used[:6]:
            reply, whoami, _ = _authenticate(url, params, processes, port)
            assert reply["error"]["code"] == -32002 and "nonce unknown, used or expired" in reply["error"]["message"]
            assert whoami["authenticated"] is False
        # Nor does the URL take one that the method took.
        assert _refused(f"{url}?pubkey={user.pubkey}&sig={used[6]['signature']}&nonce={used[6]['nonce']}")[0] == 401
        # A session's own nonce is bound to it: another connection's URL is refused, its own takes it.
        with connect(url, open_timeout=30) as ws:
            nonce = request(ws, "fetch_nonce", {"pubkey": user.pubkey})["result"]["nonce"]
            signature = user.eth_sign(nonce)
            assert _refused(f"{url}?pubkey={user.pubkey}&sig={signature}&nonce={nonce}") == (
                401, "Authentication failed: nonce unknown, used or expired")
            assert request(ws, "authenticate", {"pubkey": user.pubkey, "signature": signature, "nonce": nonce},
                           id_=3)["result"]["authenticated"] is True
    assert "Traceback" not in server.output


# --- the Redis store, two of them on one real Redis (two processes) --------------------------

TTL = 300.0


def _store(redis_server, start, **kw) -> RedisNonceStore:
    kw.setdefault("cap", 100)
    return start(RedisNonceStore(parse_redis_url(redis_server.url), reactor=reactor, prefix="circles:", ttl=TTL,
                                 **kw))


async def _outcome(d):
    """The result of ``d``, or the exception it failed with."""
    try:
        return await d
    except Exception as e:  # any exception: what the test compares
        return e


@pytest_twisted.ensureDeferred
async def test_a_nonce_from_one_store_is_taken_once_by_any(redis_server, redis_client, start):
    one, two = _store(redis_server, start), _store(redis_server, start)
    user = Key()
    before = reactor.seconds()
    nonce = await one.issue(user.pubkey, "203.0.113.7")
    assert len(nonce.value) == 2 * NONCE_BYTES
    assert math.ceil(before + TTL) <= nonce.expires_at <= math.ceil(reactor.seconds() + TTL)
    key = nonce_key("circles:", nonce.value)
    assert redis_client("GET", key) == f"{user.pubkey}|203.0.113.7"
    # Redis expires it when the client was told (its own clock), to the millisecond.
    assert (TTL - 2) * 1000 < redis_client("PTTL", key) <= (TTL + 1) * 1000
    assert await two.redeem_value(nonce.value, user.pubkey, user.eth_sign(nonce.value)) == user.pubkey
    assert redis_client("EXISTS", key) == 0
    for store in (one, two):  # used: neither takes it again
        refused = await _outcome(store.redeem_value(nonce.value, user.pubkey, user.eth_sign(nonce.value)))
        assert isinstance(refused, AuthenticationFailed) and "unknown, used or expired" in str(refused)
    # Each process counts what it issued; one redeemed elsewhere until it would expire.
    assert (one.live(), two.live()) == (1, 0)
    mine = await one.issue(None, "203.0.113.7")
    assert await one.redeem_value(mine.value, user.pubkey, user.der_sign(mine.value)) == user.pubkey
    assert one.live() == 1


@pytest_twisted.ensureDeferred
async def test_two_stores_racing_for_one_nonce_let_one_win(redis_server, start):
    one, two = _store(redis_server, start), _store(redis_server, start)
    user = Key()
    for _ in range(20):
        nonce = await one.issue(user.pubkey)
        signature = user.eth_sign(nonce.value)
        results = await DeferredList([one.redeem_value(nonce.value, user.pubkey, signature),
                                      two.redeem_value(nonce.value, user.pubkey, signature)], consumeErrors=True)
        assert sorted(ok for ok, _ in results) == [False, True]


@pytest_twisted.ensureDeferred
async def test_a_bad_proof_uses_the_nonce_up_and_made_up_nonces_cost_redis_nothing(redis_server, redis_client,
                                                                                  start):
    store = _store(redis_server, start)
    user, other = Key(), Key()
    nonce = await store.issue(user.pubkey)
    refused = await _outcome(store.redeem_value(nonce.value, user.pubkey, other.eth_sign(nonce.value)))
    assert isinstance(refused, AuthenticationFailed)
    refused = await _outcome(store.redeem_value(nonce.value, user.pubkey, user.eth_sign(nonce.value)))
    assert "unknown, used or expired" in str(refused)  # the bad attempt used it up: a URL cannot be replayed
    bound = await store.issue(other.pubkey)
    refused = await _outcome(store.redeem_value(bound.value, user.pubkey, user.eth_sign(bound.value)))
    assert "issued for another public key" in str(refused)
    redis_client("CONFIG", "RESETSTAT")
    for made_up in ("0" * 32, "f" * 32):  # of the form: asked, found nowhere, nothing made
        assert isinstance(await _outcome(store.redeem_value(made_up, user.pubkey, "00")), AuthenticationFailed)
    for made_up in ("x" * 10_000, "A" * 32, "0" * 31, "0" * 33, "0" * 31 + "\n", ""):  # not of the form: not asked
        assert isinstance(await _outcome(store.redeem_value(made_up, user.pubkey, "00")), AuthenticationFailed)
    stats = redis_client("INFO", "commandstats")
    assert "cmdstat_getdel:calls=2," in stats and "cmdstat_set:" not in stats
    assert redis_client("DBSIZE") == 0


@pytest_twisted.ensureDeferred
async def test_what_a_process_puts_in_redis_is_bounded_by_its_caps(redis_server, redis_client, start):
    store = _store(redis_server, start, cap=5, per_owner=2)
    for _ in range(2):
        await store.issue(None, "a")
    assert isinstance(await _outcome(store.issue(None, "a")), TooManyNoncesForOwner)
    for owner in ("b", "b", "c"):
        await store.issue(None, owner)
    refused = await _outcome(store.issue(None, "d"))
    assert isinstance(refused, TooManyNonces) and not isinstance(refused, TooManyNoncesForOwner)
    assert redis_client("DBSIZE") == 5 == store.live()


@pytest_twisted.ensureDeferred
async def test_a_process_counts_its_nonces_until_they_expire_by_its_clock(redis_server, redis_client, start):
    clock = Clock()
    clock.advance(reactor.seconds())
    store = _store(redis_server, start, cap=10, per_owner=2, clock=clock)
    first = await store.issue(None, "a")
    assert first.expires_at == math.ceil(clock.seconds() + TTL)  # what the client is told: the injected clock's
    clock.advance(100)
    await store.issue(None, "a")
    assert isinstance(await _outcome(store.issue(None, "a")), TooManyNoncesForOwner)
    clock.advance(TTL - 100 + 1)  # the first expired (Redis expires its key by its own clock)
    assert store.live() == 1
    await store.issue(None, "a")
    clock.advance(TTL + 1)
    assert store.live() == 0
    assert redis_client("DBSIZE") == 3


@pytest_twisted.ensureDeferred
async def test_redis_down_or_full_is_backend_unavailable_and_holds_no_place(redis_server, redis_client, start):
    store = _store(redis_server, start, cap=3, timeout=1.0)
    user = Key()
    kept = await store.issue(user.pubkey)
    redis_client("CONFIG", "SET", "maxmemory", "1")  # noeviction, the default: full
    for _ in range(5):
        assert isinstance(await _outcome(store.issue(user.pubkey)), BackendFull)
    assert store.live() == 1  # a refused nonce holds no place
    # Taking needs no memory: a full Redis still redeems.
    assert await store.redeem_value(kept.value, user.pubkey, user.eth_sign(kept.value)) == user.pubkey
    redis_client("CONFIG", "SET", "maxmemory", "0")
    redis_server.kill()
    await eventually(lambda: not store.is_connected())  # (a command sent as it died may have been applied: counted)
    for _ in range(5):
        refused = await _outcome(store.issue(user.pubkey))
        assert isinstance(refused, BackendUnavailable) and not isinstance(refused, BackendFull)
    assert store.live() == 0
    redis_server.start()
    await eventually(store.is_connected)
    assert (await store.issue(user.pubkey)).value


# --- the server: GET /auth/nonce and the handshake on a real Redis ---------------------------


def _in_thread(function, *args):
    return threads.deferToThread(function, *args)


async def _nonce_url(port: int, user: Key) -> str:
    status, _, body = await _in_thread(_fetch, f"http://127.0.0.1:{port}/auth/nonce?public_key={user.pubkey}")
    assert status == 200, body
    return (f"/{CIRCLE}?pubkey={user.pubkey}&sig={user.eth_sign(body['nonce'])}&nonce={body['nonce']}",
            body["nonce"])


@pytest_twisted.ensureDeferred
async def test_redis_down_or_full_is_503_never_a_traceback(redis_server, redis_client, start):
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        await _down_or_full(redis_server, redis_client, start)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if "log_failure" in e] == []


async def _down_or_full(redis_server, redis_client, start):
    service, port = await serve(start, redis_server.url)
    user = Key()
    path, _ = await _nonce_url(port, user)
    assert await _in_thread(_whoami, f"ws://127.0.0.1:{port}{path}") == {
        "circle": CIRCLE, "authenticated": True, "pubkey": user.pubkey}
    path, _ = await _nonce_url(port, user)  # issued while Redis is there, used once it is not
    redis_client("CONFIG", "SET", "maxmemory", "1")
    status, headers, body = await _in_thread(_fetch, f"http://127.0.0.1:{port}/auth/nonce")
    assert (status, headers.get("retry-after"), body) == (503, "5", {"error": "the nonce store is full, retry later"})
    redis_client("CONFIG", "SET", "maxmemory", "0")
    redis_server.kill()
    await eventually(lambda: not service.nonces.is_connected())
    status, headers, body = await _in_thread(_fetch, f"http://127.0.0.1:{port}/auth/nonce")
    assert (status, headers.get("retry-after"), body) == (503, "5", {
        "error": "the nonce store is unavailable, retry later"})
    assert await _in_thread(_refused, f"ws://127.0.0.1:{port}{path}") == (503, "Nonce store unavailable, retry later")
    assert service.nonces.live() == 1  # the one not redeemed; the refused ones hold no place
    redis_server.start()
    await eventually(service.nonces.is_connected)
    path, _ = await _nonce_url(port, user)
    assert (await _in_thread(_whoami, f"ws://127.0.0.1:{port}{path}"))["authenticated"] is True


def _upgrade(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    return sock


def _flood(sock: socket.socket, most: int) -> int:
    """Send up to ``most`` bytes without blocking; how many the kernel took."""
    sock.setblocking(False)
    sent, chunk = 0, b"\x81" * 65536
    while sent < most:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                break
    return sent


def _waiting_handshakes(service) -> list:
    import gc
    return [p for p in gc.get_objects() if type(p).__name__ == "CircleProtocol" and getattr(p, "factory", None)
            is service.factory and p.state == p.STATE_CONNECTING and getattr(p, "_wskey", None)]


@pytest_twisted.ensureDeferred
async def test_a_handshake_waiting_for_redis_holds_no_more_bytes_and_nothing_once_the_client_left(
        redis_server, redis_client, start):
    service, port = await serve(start, redis_server.url)
    path, nonce = await _nonce_url(port, Key())
    redis = psutil.Process(redis_server.process.pid)
    redis.suspend()  # Redis does not answer: the handshake waits for its GETDEL
    try:
        sock = await _in_thread(_upgrade, port, path)
        [waiting] = await eventually(lambda: _waiting_handshakes(service))
        sent = await _in_thread(_flood, sock, 8 * 1024 * 1024)
        await _in_thread(time.sleep, 0.5)  # the reactor's chance to read more, were it reading
        held = len(waiting.data)
        assert held < 64 * 1024 and sent > 4 * held + 64 * 1024, (held, sent)
        sock.close()
        await eventually(lambda: waiting.state == waiting.STATE_CLOSED)
    finally:
        redis.resume()
    await eventually(lambda: redis_client("EXISTS", nonce_key("circles:", nonce)) == 0)  # taken at last
    await eventually(lambda: service.nonces._connecting is None)
    # Counted out once the reactor sees each close (the nonce's HTTP request's too): nothing stays.
    await eventually(lambda: service.factory.open_connections == set() and service.factory.connections.open == 0)
    assert waiting.session is None or not waiting.session.plays


@pytest_twisted.ensureDeferred
async def test_the_handshake_deadline_holds_while_redis_does_not_answer(redis_server, start):
    service, port = await serve(start, redis_server.url, handshake_timeout=1.0)
    path, _ = await _nonce_url(port, Key())
    redis = psutil.Process(redis_server.process.pid)
    redis.suspend()
    try:
        # A valid proof, refused 503 rather than waiting for Redis (which would have let it in).
        assert await _in_thread(_refused, f"ws://127.0.0.1:{port}{path}") == (
            503, "Nonce store unavailable, retry later")
    finally:
        redis.resume()
    # Closed by the server as it answered; counted out once the reactor sees the close.
    await eventually(lambda: service.factory.open_connections == set() and service.factory.connections.open == 0)


# --- the authenticate method with a nonce in Redis ---------------------------------------------


async def _http_nonce(port: int, user: Key) -> dict:
    status, _, body = await _in_thread(_fetch, f"http://127.0.0.1:{port}/auth/nonce?public_key={user.pubkey}")
    assert status == 200, body
    return {"pubkey": user.pubkey, "signature": user.eth_sign(body["nonce"]), "nonce": body["nonce"]}


def _pipelined(url: str, params: dict) -> list:
    """authenticate and whoami sent back to back, without waiting: their replies."""
    with connect(url, open_timeout=30) as ws:
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "authenticate", "params": params, "id": 1}))
        ws.send(json.dumps({"jsonrpc": "2.0", "method": "whoami", "id": 2}))
        return [json.loads(ws.recv(timeout=30)) for _ in range(2)]


@pytest_twisted.ensureDeferred
async def test_requests_after_authenticate_wait_for_redis_to_take_the_nonce(redis_server, redis_client, start):
    service, port = await serve(start, redis_server.url)
    user = Key()
    params = await _http_nonce(port, user)
    redis = psutil.Process(redis_server.process.pid)
    redis.suspend()  # Redis does not answer: authenticate waits for its GETDEL, and whoami for authenticate
    try:
        replies = _in_thread(_pipelined, f"ws://127.0.0.1:{port}/{CIRCLE}", params)
        [waiting] = await eventually(lambda: [p for p in service.factory.open_connections if p.session.proving])
        assert waiting.holding()
    finally:
        redis.resume()
    authenticated, whoami = await replies
    assert (authenticated["id"], authenticated["result"]) == (1, {"authenticated": True, "pubkey": user.pubkey})
    assert (whoami["id"], whoami["result"]) == (2, {"circle": CIRCLE, "authenticated": True, "pubkey": user.pubkey})
    assert redis_client("EXISTS", nonce_key("circles:", params["nonce"])) == 0


def _authenticate_once(url: str, params: dict) -> tuple[dict, dict]:
    with connect(url, open_timeout=30) as ws:
        return request(ws, "authenticate", params), request(ws, "whoami", id_=2)["result"]


@pytest_twisted.ensureDeferred
async def test_authenticate_while_redis_is_down_is_backend_unavailable(redis_server, redis_client, start):
    service, port = await serve(start, redis_server.url)
    url = f"ws://127.0.0.1:{port}/{CIRCLE}"
    user = Key()
    params = await _http_nonce(port, user)  # issued while Redis is there, used once it is not
    redis_client("CONFIG", "SET", "maxmemory", "1")  # full: taking needs no memory, so it still works
    reply, whoami = await _in_thread(_authenticate_once, url, params)
    assert reply["result"]["authenticated"] is True and whoami["authenticated"] is True
    redis_client("CONFIG", "SET", "maxmemory", "0")
    params = await _http_nonce(port, user)
    redis_server.kill()
    await eventually(lambda: not service.nonces.is_connected())
    reply, whoami = await _in_thread(_authenticate_once, url, params)
    assert reply["error"]["code"] == -32004 and reply["error"]["message"] == "Nonce store unavailable, retry later"
    # Why: the wait for a connection ran out (the first command), or it had already.
    assert reply["error"]["data"] in ("Redis did not answer within 5s", "Redis is unreachable")
    assert whoami["authenticated"] is False
    redis_server.start()
    await eventually(service.nonces.is_connected)
    reply, whoami = await _in_thread(_authenticate_once, url, await _http_nonce(port, user))
    assert reply["result"]["authenticated"] is True and whoami["authenticated"] is True


def _open_and_authenticate(port: int, params: dict) -> socket.socket:
    """A raw WebSocket: opened, then one authenticate frame sent (masked with a zero key)."""
    sock = _upgrade(port, f"/{CIRCLE}")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = json.dumps({"jsonrpc": "2.0", "method": "authenticate", "params": params, "id": 1}).encode()
    assert len(payload) < 65536
    sock.sendall(bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload)
    return sock


@pytest_twisted.ensureDeferred
async def test_a_connection_waiting_for_redis_to_take_a_nonce_reads_no_more(redis_server, start):
    service, port = await serve(start, redis_server.url)
    params = await _http_nonce(port, Key())
    redis = psutil.Process(redis_server.process.pid)
    redis.suspend()
    try:
        sock = await _in_thread(_open_and_authenticate, port, params)
        [waiting] = await eventually(lambda: [p for p in service.factory.open_connections if p.session.proving])
        sent = await _in_thread(_flood, sock, 8 * 1024 * 1024)
        await _in_thread(time.sleep, 0.5)  # the reactor's chance to read more, were it reading
        held = len(waiting.data)
        assert held < 64 * 1024 and sent > 4 * held + 64 * 1024, (held, sent)
        sock.close()
        await eventually(lambda: waiting.state == waiting.STATE_CLOSED)
    finally:
        redis.resume()
    await eventually(lambda: service.factory.open_connections == set() and service.factory.connections.open == 0)
    assert waiting.session.proving is None and waiting.session.in_flight == 0
