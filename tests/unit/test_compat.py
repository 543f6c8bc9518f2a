"""The request forms of the ecosystem's earlier clients, HTTP nonces and URL authentication.

The server runs in-process on a real port, with a ``Clock`` as the gateway's time so nonce
expiry can be driven; clients are urllib (HTTP) and the websockets library (WebSocket).
"""

import json
import re
import socket
import urllib.error
import urllib.request

import pytest
import pytest_twisted
import websockets
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest
from websockets.sync.client import connect

from circles.protocol import CircleFactory
from circles.server.config import Config
from circles.server.gateway import Gateway
from circles.server.http.nonce_route import client_of
from circles.service import build_site

from ..inmemory import NoScriptBackend, open_session, session_layer
from ..support import Key, request


def _rpc(session, method, params=None, id_=1):
    """Call a method whose answer needs no I/O: the reply comes at once."""
    message = {"jsonrpc": "2.0", "method": method, "id": id_}
    if params is not None:
        message["params"] = params
    reply = session.answer(json.dumps(message))
    assert isinstance(reply, str)
    return json.loads(reply)


@pytest.fixture
def session():
    gateway = Gateway(Config(nonce_ttl=300), Clock(), NoScriptBackend())
    return open_session(gateway, Key().pubkey)


def _v(signature: str, v: int) -> str:
    return signature[:-2] + format(v, "02x")


@pytest.mark.parametrize("form", ["named", "credentials", "positional", "positional-object"])
def test_authenticate_forms(session, form):
    user = Key()
    nonce = _rpc(session, "fetch_nonce", [user.pubkey])["result"]["nonce"]  # positional fetch_nonce
    pair = {"pubkey": user.pubkey, "signature": user.eth_sign(nonce)}
    params = {"named": pair, "credentials": {"credentials": pair},
              "positional": [pair["pubkey"], pair["signature"]], "positional-object": [pair]}[form]
    assert _rpc(session, "authenticate", params)["result"] == {"authenticated": True, "pubkey": user.pubkey}


@pytest.mark.parametrize("params", [
    {"credentials": "x"}, {"credentials": {"pubkey": "02"}}, ["only-one"], [{"pubkey": "02"}],
    {"pubkey": 1, "signature": "00"}, {"credentials": {}, "pubkey": "x"}, [[]],
])
def test_authenticate_malformed_forms_are_invalid_params(session, params):
    assert _rpc(session, "authenticate", params)["error"]["code"] == -32602


@pytest.mark.parametrize("prefix", ["", "0x"])
@pytest.mark.parametrize("v_offset", [0, 27])
@pytest.mark.parametrize("uncompressed", [False, True])
def test_key_and_signature_spellings(session, prefix, v_offset, uncompressed):
    user = Key()
    pubkey = prefix + (user.uncompressed if uncompressed else user.pubkey)
    nonce = _rpc(session, "fetch_nonce", {"pubkey": pubkey})["result"]["nonce"]
    signature = user.eth_sign(nonce)
    recovery = int(signature[-2:], 16) - 27
    signature = prefix + _v(signature.removeprefix("0x"), recovery + v_offset)
    reply = _rpc(session, "authenticate", {"pubkey": pubkey, "signature": signature})
    assert reply["result"] == {"authenticated": True, "pubkey": user.pubkey}


@pytest.mark.parametrize("v", [37, 38, 2, 29, 255])
def test_eip155_and_other_v_values_are_refused(session, v):
    user = Key()
    nonce = _rpc(session, "fetch_nonce", {"pubkey": user.pubkey})["result"]["nonce"]
    reply = _rpc(session, "authenticate", {"pubkey": user.pubkey, "signature": _v(user.eth_sign(nonce), v)})
    assert reply["error"]["code"] == -32002
    assert _rpc(session, "whoami")["result"]["authenticated"] is False


@pytest.mark.parametrize("scheme", ["eth", "der"])
def test_fetch_nonce_without_pubkey_binds_to_the_signer(session, scheme):
    user = Key()
    nonce = _rpc(session, "fetch_nonce")["result"]["nonce"]
    signature = user.eth_sign(nonce) if scheme == "eth" else user.der_sign(nonce)
    reply = _rpc(session, "authenticate", {"pubkey": user.pubkey, "signature": signature})
    assert reply["result"]["pubkey"] == user.pubkey
    # used once: the same proof fails again
    assert _rpc(session, "authenticate", {"pubkey": user.pubkey, "signature": signature})["error"]["code"] == -32002


# --- HTTP nonces and URL authentication, over real sockets -----------------------------------


@pytest_twisted.async_yield_fixture
async def server():
    """A gateway on 127.0.0.1 whose nonces follow ``server.clock``."""
    clock = Clock()
    clock.advance(1_700_000_000)
    gateway = Gateway(Config(nonce_ttl=300, max_http_nonces=50, auth_required=True), clock, NoScriptBackend())
    port = reactor.listenTCP(0, build_site(CircleFactory(session_layer(gateway)), reactor), interface="127.0.0.1")
    gateway.base = f"127.0.0.1:{port.getHost().port}"
    gateway.circle = Key().pubkey
    yield gateway
    await port.stopListening()


def _fetch(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _get(url: str):
    """GET in a thread (the reactor serves meanwhile); fires with (status, JSON body)."""
    return threads.deferToThread(_fetch, url)


def _in_thread(function, *args):
    return threads.deferToThread(function, *args)


@pytest_twisted.ensureDeferred
async def test_http_nonce(server):
    user = Key()
    status, body = await _get(f"http://{server.base}/auth/nonce?public_key=0x{user.uncompressed}")
    assert status == 200 and len(body["nonce"]) >= 32
    assert body["expires_at"] == 1_700_000_300 and isinstance(body["expires_at"], int)
    status, body = await _get(f"http://{server.base}/auth/nonce")
    assert status == 200 and body["nonce"]
    for bad in ("zz", "02" + "00" * 32, "02abcd"):
        status, body = await _get(f"http://{server.base}/auth/nonce?public_key={bad}")
        assert status == 400 and body["error"].startswith("public_key: ")
    status, body = await _get(f"http://{server.base}/auth/health")
    assert status == 200
    assert body == {"status": "healthy", "active_nonces": 2, "timestamp": 1_700_000_000}


@pytest_twisted.ensureDeferred
async def test_http_nonce_wrong_method(server):
    def post():
        req = urllib.request.Request(f"http://{server.base}/auth/nonce", data=b"", method="POST")
        try:
            urllib.request.urlopen(req, timeout=30)
        except urllib.error.HTTPError as e:
            return e.code
    assert await _in_thread(post) == 405


@pytest_twisted.ensureDeferred
async def test_http_nonce_flood_is_capped_and_swept(server):
    statuses = [(await _get(f"http://{server.base}/auth/nonce"))[0] for _ in range(60)]
    assert statuses == [200] * 50 + [429] * 10
    assert (await _get(f"http://{server.base}/auth/health"))[1]["active_nonces"] == 50
    server.clock.advance(301)  # every nonce expires; the store empties as it is swept
    assert (await _get(f"http://{server.base}/auth/health"))[1]["active_nonces"] == 0
    assert (await _get(f"http://{server.base}/auth/nonce"))[0] == 200


def _url_session(url: str) -> dict:
    with connect(url) as ws:
        return request(ws, "whoami")["result"]


def _refused(url: str) -> int:
    try:
        with connect(url):
            return 101
    except websockets.exceptions.InvalidStatus as e:
        return e.response.status_code


@pytest_twisted.ensureDeferred
async def test_url_authentication(server):
    user = Key()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        nonce = (await _get(f"http://{server.base}/auth/nonce?public_key={user.pubkey}"))[1]["nonce"]
        signature = user.eth_sign(nonce)  # eth-account
        url = f"ws://{server.base}/{server.circle}?pubkey={user.pubkey}&sig={signature}&nonce={nonce}"
        assert await _in_thread(_url_session, url) == {"circle": server.circle, "authenticated": True, "pubkey": user.pubkey}
        assert await _in_thread(_refused, url) == 401  # replayed
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = "\n".join(formatEvent(e) or "" for e in events) + repr(events)
    assert signature.removeprefix("0x") not in logged and nonce not in logged


@pytest_twisted.ensureDeferred
async def test_url_authentication_refusals(server):
    user, other = Key(), Key()
    base = f"ws://{server.base}/{server.circle}"

    async def fresh(pubkey=None):
        query = f"?public_key={pubkey}" if pubkey else ""
        return (await _get(f"http://{server.base}/auth/nonce{query}"))[1]["nonce"]

    nonce = await fresh(user.pubkey)
    assert await _in_thread(_refused, f"{base}?pubkey={user.pubkey}&sig={other.eth_sign(nonce)}&nonce={nonce}") == 401
    # the failed attempt used the nonce up
    assert await _in_thread(_refused, f"{base}?pubkey={user.pubkey}&sig={user.eth_sign(nonce)}&nonce={nonce}") == 401
    nonce = await fresh(other.pubkey)  # issued for another key
    assert await _in_thread(_refused, f"{base}?pubkey={user.pubkey}&sig={user.eth_sign(nonce)}&nonce={nonce}") == 401
    nonce = await fresh(user.pubkey)
    assert await _in_thread(_refused, f"{base}?pubkey={user.pubkey}&nonce={nonce}") == 401  # partial
    assert await _in_thread(_refused, f"{base}?pubkey=zz&sig=00&nonce={nonce}") == 401
    assert await _in_thread(_refused, f"{base}?pubkey={user.pubkey}&sig=00&nonce=never-issued") == 401
    nonce = await fresh()
    server.clock.advance(300)  # expired
    assert await _in_thread(_refused, f"{base}?pubkey={user.pubkey}&sig={user.eth_sign(nonce)}&nonce={nonce}") == 401
    # An unbound HTTP nonce, signed with the DER form, is accepted.
    nonce = await fresh()
    url = f"{base}?pubkey={user.pubkey}&sig={user.der_sign(nonce)}&nonce={nonce}"
    assert (await _in_thread(_url_session, url))["pubkey"] == user.pubkey
    # Without the query, the session is anonymous as usual.
    assert (await _in_thread(_url_session, base))["authenticated"] is False


def _pipelined_nonces(base: str, n: int, source: str = "127.0.0.1") -> list:
    """``n`` pipelined ``GET /auth/nonce`` on one connection from ``source``: the statuses."""
    host, port = base.split(":")
    one = b"GET /auth/nonce HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /auth/nonce HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0)) as sock:
        sock.sendall(one * (n - 1) + last)
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


@pytest_twisted.async_yield_fixture
async def shared_server():
    """Like ``server``, with a per-address share of the HTTP nonces."""
    clock = Clock()
    gateway = Gateway(Config(nonce_ttl=300, max_http_nonces=50, max_http_nonces_per_ip=10), clock,
                      NoScriptBackend())
    port = reactor.listenTCP(0, build_site(CircleFactory(session_layer(gateway)), reactor), interface="127.0.0.1")
    gateway.base = f"127.0.0.1:{port.getHost().port}"
    gateway.clock = clock
    yield gateway
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_one_address_cannot_take_every_http_nonce(shared_server):
    """Pipelined GET /auth/nonce from one socket filled the process-wide store, and
    every client got 429 until the nonces expired."""
    statuses = await _in_thread(_pipelined_nonces, shared_server.base, 300)
    assert statuses == [200] * 10 + [429] * 290
    # Others have their own share...
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
        assert await _in_thread(_pipelined_nonces, shared_server.base, 11, source) == [200] * 10 + [429]
    # ...within the total, which still holds.
    assert await _in_thread(_pipelined_nonces, shared_server.base, 1, "127.0.0.6") == [429]
    status, body = await _get(f"http://{shared_server.base}/auth/health")
    assert body["active_nonces"] == 50
    shared_server.clock.advance(301)
    assert await _in_thread(_pipelined_nonces, shared_server.base, 1) == [200]


@pytest.mark.parametrize("address, owner", [
    (IPv4Address("TCP", "203.0.113.7", 1), "203.0.113.7"),
    (IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1), "2001:db8:1:2::/64"),
    (IPv6Address("TCP", "2001:db8:1:2:bbbb::9", 1), "2001:db8:1:2::/64"),  # one host holds its /64 whole
    (IPv6Address("TCP", "fe80::1%eth0", 1), "fe80::/64"),
    (IPv6Address("TCP", "2001:db8:1:3::1", 1), "2001:db8:1:3::/64"),
    # An IPv4 client of a dual-stack port is its IPv4 address, not "::/64" with every other one.
    (IPv6Address("TCP", "::ffff:203.0.113.7", 1), "203.0.113.7"),
])
def test_http_nonces_count_against_the_address_or_its_64(address, owner):
    # Twisted's own request stand-in: loopback gives one IPv6 address, ::1, not two in a /64.
    request = DummyRequest([b"auth", b"nonce"])
    request.client = address
    assert client_of(request) == owner
