"""The session API and the WebSocket protocol, in memory, no sockets, no real time.

Two levels:
* ``Session.handle``: JSON text in, JSON text out, with a ``twisted.internet.task.Clock``.
* ``CircleProtocol`` for real: an Autobahn client protocol and our server protocol joined by
  ``twisted.test.iosim`` transports, pumped by hand; every Autobahn/txaio timer goes to a
  ``Clock`` (``txaio.config.loop``), so nothing touches the global reactor.

Scripts run on a fake ``IScriptRunner`` defined here. The Redis backend is a separate issue;
what is checked here is the contract between ``play`` and any runner: the request it gets
(timeout capping included) and how runner failures map to -32003/-32004/-32005.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import coincurve
import pytest
import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from eth_account import Account
from eth_account.messages import encode_defunct
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from zope.interface import implementer

from circles.backend.scripts import (
    SOURCE_WS,
    BackendUnavailable,
    IScriptRunner,
    ScriptFailed,
    ScriptTimeout,
)
from circles.protocol import CircleFactory
from circles.server.access.nonces import INonceStore
from circles.server.config import Config
from circles.server.gateway import Gateway

from ..inmemory import NoScriptBackend, captured_log, fired, open_session, replied, session_layer
from ..support import source_digest

OPENRPC = Path(__file__).resolve().parents[2] / "openrpc.json"
NOW = 1_700_000_000.0
TTL = 300.0
SCRIPT_TIMEOUT = 30.0


# --- fixtures and helpers -----------------------------------------------------------------------


@implementer(IScriptRunner)
class FakeRunner:
    """Records each request and hands back a Deferred the test fires."""

    def __init__(self) -> None:
        self.requests: list = []
        self.pending: list = []

    def run(self, request) -> Deferred:
        d = Deferred()
        self.requests.append(request)
        self.pending.append(d)
        return d


class Key:
    def __init__(self, secret: bytes | None = None) -> None:
        self.private = coincurve.PrivateKey(secret)
        self.pubkey = self.private.public_key.format(compressed=True).hex()
        self.uncompressed = self.private.public_key.format(compressed=False).hex()

    def eth(self, nonce: str) -> str:
        signed = Account.sign_message(encode_defunct(text=nonce), private_key=self.private.secret)
        return "0x" + bytes(signed.signature).hex()

    def der(self, nonce: str) -> str:
        return self.private.sign(nonce.encode("utf-8")).hex()


CIRCLE = Key(bytes([1]) * 32).pubkey  # fixed: named in test ids, which every xdist worker must collect alike
OTHER_CIRCLE = Key(bytes([2]) * 32).pubkey  # fixed: named in test ids, which every xdist worker must collect alike


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


def make_gateway(clock, runner=None, **config) -> Gateway:
    config.setdefault("nonce_ttl", TTL)
    config.setdefault("script_timeout", SCRIPT_TIMEOUT)
    return Gateway(Config(**config), clock, runner if runner is not None else NoScriptBackend())


_ids = itertools.count(1)


def rpc(session, method, params=None):
    """Call ``method`` on ``session``; return the parsed reply (which must come at once)."""
    request = {"jsonrpc": "2.0", "method": method, "id": next(_ids)}
    if params is not None:
        request["params"] = params
    reply = json.loads(replied(session.answer(json.dumps(request).encode("utf-8"))))
    assert reply["id"] == request["id"]
    return reply


def login(session, key: Key, signer: str = "eth") -> dict:
    nonce = rpc(session, "fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    return rpc(session, "authenticate", {"pubkey": key.pubkey, "signature": getattr(key, signer)(nonce)})


def error_code(reply) -> int:
    assert "result" not in reply, reply
    return reply["error"]["code"]


# --- authentication through Session.handle ------------------------------------------------------


@pytest.mark.parametrize("signer", ["eth", "der"])
def test_full_auth_flow(clock, signer):
    session = open_session(make_gateway(clock), CIRCLE)
    key = Key()
    assert rpc(session, "whoami")["result"] == {"circle": CIRCLE, "authenticated": False, "pubkey": None}
    issued = rpc(session, "fetch_nonce", {"pubkey": key.uncompressed})["result"]
    assert set(issued) == {"nonce", "expires_at"}
    assert issued["expires_at"] == NOW + TTL
    signature = getattr(key, signer)(issued["nonce"])
    reply = rpc(session, "authenticate", [key.uncompressed, signature])
    assert reply["result"] == {"authenticated": True, "pubkey": key.pubkey}
    assert rpc(session, "whoami")["result"] == {"circle": CIRCLE, "authenticated": True, "pubkey": key.pubkey}


def test_authentication_logs_no_signature(clock):
    session = open_session(make_gateway(clock), CIRCLE)
    key = Key()
    nonce = rpc(session, "fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    bad = Key().eth(nonce)
    good = key.eth(nonce)
    with captured_log() as events:
        assert error_code(rpc(session, "authenticate", {"pubkey": key.pubkey, "signature": bad})) == -32002
        rpc(session, "authenticate", {"pubkey": key.pubkey, "signature": good})
    assert events
    logged = repr(events)
    assert bad[2:] not in logged and good[2:] not in logged


def test_nonce_from_another_connection_refused(clock):
    gateway = make_gateway(clock)
    first, second = open_session(gateway, CIRCLE), open_session(gateway, CIRCLE)
    key = Key()
    nonce = rpc(first, "fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    reply = rpc(second, "authenticate", {"pubkey": key.pubkey, "signature": key.eth(nonce)})
    assert error_code(reply) == -32002
    assert rpc(second, "whoami")["result"]["authenticated"] is False
    # the nonce is still good where it was issued
    assert rpc(first, "authenticate", {"pubkey": key.pubkey, "signature": key.eth(nonce)})["result"]["authenticated"]


def test_expired_nonce_refused_and_session_stays_unauthenticated(clock):
    session = open_session(make_gateway(clock), CIRCLE)
    key = Key()
    nonce = rpc(session, "fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    clock.advance(TTL)
    reply = rpc(session, "authenticate", {"pubkey": key.pubkey, "signature": key.eth(nonce)})
    assert error_code(reply) == -32002
    assert rpc(session, "whoami")["result"] == {"circle": CIRCLE, "authenticated": False, "pubkey": None}


@pytest.mark.parametrize("case", ["other-key", "used-nonce", "no-nonce", "bad-hex", "bad-pubkey",
                                  "not-on-curve", "wrong-length", "eip155-v", "other-pubkey-nonce"])
def test_failed_authenticate_leaves_previous_state(clock, case):
    session = open_session(make_gateway(clock), CIRCLE)
    alice, bob = Key(), Key()
    assert login(session, alice)["result"]["pubkey"] == alice.pubkey
    if case == "used-nonce":
        nonce = rpc(session, "fetch_nonce", {"pubkey": bob.pubkey})["result"]["nonce"]
        params = {"pubkey": bob.pubkey, "signature": bob.eth(nonce)}
        assert rpc(session, "authenticate", params)["result"]["pubkey"] == bob.pubkey
        assert login(session, alice)["result"]["pubkey"] == alice.pubkey
    else:
        nonce = rpc(session, "fetch_nonce", {"pubkey": bob.pubkey})["result"]["nonce"]
        params = {
            "other-key": {"pubkey": bob.pubkey, "signature": Key().eth(nonce)},
            "no-nonce": {"pubkey": Key().pubkey, "signature": bob.eth(nonce)},
            "bad-hex": {"pubkey": bob.pubkey, "signature": "0xnothex"},
            "bad-pubkey": {"pubkey": "zz", "signature": bob.eth(nonce)},
            "not-on-curve": {"pubkey": "02" + "00" * 32, "signature": bob.eth(nonce)},
            "wrong-length": {"pubkey": bob.pubkey, "signature": bob.eth(nonce)[:-2]},
            "eip155-v": {"pubkey": bob.pubkey, "signature": bob.eth(nonce)[:-2] + "25"},
            "other-pubkey-nonce": {"pubkey": alice.pubkey, "signature": alice.eth(nonce)},
        }[case]
    reply = rpc(session, "authenticate", params)
    assert error_code(reply) == -32002
    assert reply["error"]["message"].startswith("Authentication failed")
    assert rpc(session, "whoami")["result"] == {"circle": CIRCLE, "authenticated": True, "pubkey": alice.pubkey}


def test_switch_identity_needs_a_fresh_nonce(clock):
    session = open_session(make_gateway(clock), CIRCLE)
    alice, bob = Key(), Key()
    nonce = rpc(session, "fetch_nonce", {"pubkey": alice.pubkey})["result"]["nonce"]
    rpc(session, "authenticate", {"pubkey": alice.pubkey, "signature": alice.eth(nonce)})
    # replaying the same proof fails, and so does bob signing alice's spent nonce
    assert error_code(rpc(session, "authenticate", {"pubkey": alice.pubkey, "signature": alice.eth(nonce)})) == -32002
    assert error_code(rpc(session, "authenticate", {"pubkey": bob.pubkey, "signature": bob.eth(nonce)})) == -32002
    assert login(session, bob, "der")["result"]["pubkey"] == bob.pubkey
    assert rpc(session, "whoami")["result"]["pubkey"] == bob.pubkey


@pytest.mark.parametrize("params", [
    None, {}, [], {"pubkey": CIRCLE}, {"pubkey": 1, "signature": "00"},
    {"pubkey": CIRCLE, "signature": None}, [CIRCLE, "00", "n", "extra"], {"pubkey": CIRCLE, "signature": "00", "nonce": 5},
    {"pubkey": CIRCLE, "signature": "00", "other": "x"},
])
def test_authenticate_param_shapes_are_invalid_params(clock, params):
    session = open_session(make_gateway(clock), CIRCLE)
    assert error_code(rpc(session, "authenticate", params)) == -32602


def test_authenticate_without_pubkey_is_a_well_formed_attempt(clock):
    """pubkey may be left out (personal_sign names its key); a bad signature is -32002."""
    session = open_session(make_gateway(clock), CIRCLE)
    assert error_code(rpc(session, "authenticate", {"signature": "00"})) == -32002


@pytest.mark.parametrize("pubkey", ["zz", "02" + "00" * 32, "", 5])
def test_fetch_nonce_with_bad_pubkey_is_invalid_params(clock, pubkey):
    session = open_session(make_gateway(clock), CIRCLE)
    assert error_code(rpc(session, "fetch_nonce", {"pubkey": pubkey})) == -32602


def test_fetch_nonce_cap_is_too_many_requests(clock):
    session = open_session(make_gateway(clock, max_nonces_per_session=2), CIRCLE)
    rpc(session, "fetch_nonce")
    rpc(session, "fetch_nonce", [])
    assert error_code(rpc(session, "fetch_nonce")) == -32006
    clock.advance(TTL)
    assert "nonce" in rpc(session, "fetch_nonce")["result"]


def test_batch_over_the_limit_is_too_many_requests(clock):
    session = open_session(make_gateway(clock, max_batch=2), CIRCLE)
    batch = [{"jsonrpc": "2.0", "method": "whoami", "id": i} for i in range(3)]
    reply = json.loads(replied(session.answer(json.dumps(batch))))
    assert reply["error"]["code"] == -32006 and reply["id"] is None
    assert len(json.loads(replied(session.answer(json.dumps(batch[:2]))))) == 2


def test_rpc_discover_is_the_openrpc_document(clock):
    session = open_session(make_gateway(clock), CIRCLE)
    document = json.loads(OPENRPC.read_text("utf-8"))
    assert rpc(session, "rpc.discover")["result"] == document
    names = {m["name"] for m in document["methods"]}
    assert {"fetch_nonce", "authenticate", "whoami", "play"} <= names


# --- play ------------------------------------------------------------------------------------------


def test_play_requires_auth_when_auth_is_on(clock, runner):
    session = open_session(make_gateway(clock, runner, auth_required=True), CIRCLE)
    reply = rpc(session, "play", {"script": "40 + 2"})
    assert error_code(reply) == -32001
    assert runner.requests == []
    key = Key()
    login(session, key)
    d = session.answer(json.dumps({"jsonrpc": "2.0", "method": "play", "params": {"script": "40 + 2"}, "id": 7}))
    assert not d.called
    [request] = runner.requests
    assert (request.circle, request.script, request.caller, request.source) == (CIRCLE, "40 + 2", key.pubkey, SOURCE_WS)
    runner.pending[0].callback("42")
    assert json.loads(fired(d)) == {"jsonrpc": "2.0", "result": {"output": "42"}, "id": 7}


def test_play_is_open_to_anonymous_sessions_without_auth(clock, runner):
    session = open_session(make_gateway(clock, runner, auth_required=False), CIRCLE)
    d = session.answer(json.dumps({"jsonrpc": "2.0", "method": "play", "params": ["x"], "id": 1}))
    assert runner.requests[0].caller == ""
    runner.pending[0].callback("")
    assert json.loads(fired(d))["result"] == {"output": ""}


def test_play_without_backend_is_backend_unavailable(clock):
    session = open_session(make_gateway(clock), CIRCLE)
    reply = rpc(session, "play", {"script": "1"})
    assert error_code(reply) == -32004
    assert reply["error"]["data"] == "no script backend is configured"


@pytest.mark.parametrize("given, used", [
    (None, SCRIPT_TIMEOUT), (5, 5), (0.5, 0.5), (SCRIPT_TIMEOUT, SCRIPT_TIMEOUT),
    (SCRIPT_TIMEOUT + 1, SCRIPT_TIMEOUT), (10**6, SCRIPT_TIMEOUT), (1e300, SCRIPT_TIMEOUT),
])
def test_play_timeout_lowers_never_raises_the_server_limit(clock, runner, given, used):
    session = open_session(make_gateway(clock, runner), CIRCLE)
    params = {"script": "s"} if given is None else {"script": "s", "timeout": given}
    session.answer(json.dumps({"jsonrpc": "2.0", "method": "play", "params": params, "id": 1}))
    [request] = runner.requests
    assert request.timeout == used


@pytest.mark.parametrize("timeout", [0, -1, -0.5, "5", True, None, [5]])
def test_play_bad_timeout_is_invalid_params(clock, runner, timeout):
    session = open_session(make_gateway(clock, runner), CIRCLE)
    assert error_code(rpc(session, "play", {"script": "s", "timeout": timeout})) == -32602
    assert runner.requests == []


@pytest.mark.parametrize("params", [None, {}, {"script": 1}, {"script": None}, {"script": "s", "x": 1}, ["s", 1, 2]])
def test_play_bad_params(clock, runner, params):
    session = open_session(make_gateway(clock, runner), CIRCLE)
    assert error_code(rpc(session, "play", params)) == -32602


@pytest.mark.parametrize("failure, code, data", [
    (ScriptTimeout("late"), -32003, None),
    (BackendUnavailable("redis is down"), -32004, "redis is down"),
    (ScriptFailed("error at line 3: x is undefined"), -32005, "error at line 3: x is undefined"),
])
def test_play_error_mapping(clock, runner, failure, code, data):
    session = open_session(make_gateway(clock, runner), CIRCLE)
    d = session.answer(json.dumps({"jsonrpc": "2.0", "method": "play", "params": {"script": "s"}, "id": "p"}))
    runner.pending[0].errback(failure)
    reply = json.loads(fired(d))
    assert reply["id"] == "p" and reply["error"]["code"] == code
    assert reply["error"].get("data") == data


def test_play_runner_bug_is_internal_error(clock):
    @implementer(IScriptRunner)
    class Broken:
        def run(self, request):
            return fail(RuntimeError("secret detail"))

    session = open_session(make_gateway(clock, Broken()), CIRCLE)
    with captured_log() as events:
        text = replied(session.answer(json.dumps({"jsonrpc": "2.0", "method": "play", "params": ["s"], "id": 1})))
    assert json.loads(text)["error"]["code"] == -32603
    assert "secret" not in text
    assert any(e.get("log_failure") is not None for e in events)


def test_slow_play_does_not_hold_back_other_requests(clock, runner):
    session = open_session(make_gateway(clock, runner), CIRCLE)
    slow = session.answer(json.dumps({"jsonrpc": "2.0", "method": "play", "params": ["s"], "id": 1}))
    assert rpc(session, "whoami")["result"]["circle"] == CIRCLE
    assert not slow.called
    runner.pending[0].callback("done")
    assert json.loads(fired(slow))["result"] == {"output": "done"}


# --- the WebSocket protocol over memory transports -------------------------------------------------


class Client(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.received: list = []
        self.closed = None

    def onOpen(self):
        self.opened = True

    def onMessage(self, payload, isBinary):
        assert not isBinary
        self.received.append(json.loads(payload.decode("utf-8")))

    def onClose(self, wasClean, code, reason):
        self.closed = (wasClean, code, reason)

    def call(self, method, params=None, id_=None):
        request = {"jsonrpc": "2.0", "method": method, "id": next(_ids) if id_ is None else id_}
        if params is not None:
            request["params"] = params
        self.sendMessage(json.dumps(request).encode("utf-8"))
        return request["id"]


class Connection:
    def __init__(self, factory: CircleFactory, path: str, clock: Clock) -> None:
        self.clock = clock
        self.server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        client_factory = WebSocketClientFactory(f"ws://localhost:8080{path}")
        client_factory.protocol = Client
        self.client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        self.pump = iosim.connect(
            self.server, iosim.FakeTransport(self.server, isServer=True),
            self.client, iosim.FakeTransport(self.client, isServer=False),
        )
        self.settle()

    def settle(self) -> None:
        for _ in range(20):
            self.pump.flush()
            self.clock.advance(0.001)
        self.pump.flush()

    def request(self, method, params=None):
        id_ = self.client.call(method, params)
        self.settle()
        reply = next(r for r in self.client.received if r.get("id") == id_)
        return reply


@pytest.fixture
def txaio_clock(clock, monkeypatch):
    """Autobahn's timers (handshake, close, ping) run on the test clock, not the reactor."""
    monkeypatch.setattr(txaio.config, "loop", clock)
    return clock


def connect(gateway, path=f"/{CIRCLE}") -> Connection:
    return Connection(CircleFactory(session_layer(gateway)), path, gateway.clock)


def test_ws_full_auth_flow(txaio_clock, runner):
    gateway = make_gateway(txaio_clock, runner, auth_required=True, circles=[CIRCLE])
    conn = connect(gateway)
    assert conn.client.opened
    key = Key()
    assert error_code(conn.request("play", {"script": "s"})) == -32001
    nonce = conn.request("fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    reply = conn.request("authenticate", {"pubkey": key.pubkey, "signature": key.eth(nonce)})
    assert reply["result"] == {"authenticated": True, "pubkey": key.pubkey}
    assert conn.request("whoami")["result"] == {"circle": CIRCLE, "authenticated": True, "pubkey": key.pubkey}
    # play goes to the runner, and the reply comes when the runner answers
    id_ = conn.client.call("play", {"script": "s", "timeout": 999})
    conn.settle()
    assert runner.requests[0].caller == key.pubkey and runner.requests[0].timeout == SCRIPT_TIMEOUT
    runner.pending[0].callback("out")
    conn.settle()
    assert next(r for r in conn.client.received if r["id"] == id_)["result"] == {"output": "out"}


def test_ws_auth_state_is_per_connection(txaio_clock):
    gateway = make_gateway(txaio_clock, circles=[CIRCLE])
    first, second = connect(gateway), connect(gateway)
    key = Key()
    nonce = first.request("fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    assert error_code(second.request("authenticate", {"pubkey": key.pubkey, "signature": key.eth(nonce)})) == -32002
    assert first.request("authenticate", {"pubkey": key.pubkey, "signature": key.eth(nonce)})["result"]["authenticated"]
    assert second.request("whoami")["result"]["authenticated"] is False


def test_ws_notifications_and_batches(txaio_clock):
    conn = connect(make_gateway(txaio_clock))
    conn.client.sendMessage(b'{"jsonrpc":"2.0","method":"whoami"}')
    conn.client.sendMessage(b'[]')
    conn.client.sendMessage(b'[{"jsonrpc":"2.0","method":"whoami","id":"a"},{"jsonrpc":"2.0","method":"whoami"},1]')
    conn.client.sendMessage(b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    conn.settle()
    empty, batch, parse_error = conn.client.received  # nothing for the notification
    assert empty["error"]["code"] == -32600 and empty["id"] is None
    assert [r.get("id") for r in batch] == ["a", None]
    assert batch[0]["result"]["circle"] == CIRCLE and batch[1]["error"]["code"] == -32600
    assert parse_error["error"]["code"] == -32700 and parse_error["id"] is None


def test_ws_rpc_discover(txaio_clock):
    conn = connect(make_gateway(txaio_clock))
    assert conn.request("rpc.discover")["result"] == json.loads(OPENRPC.read_text("utf-8"))


def test_ws_binary_frame_closes_1003(txaio_clock):
    conn = connect(make_gateway(txaio_clock))
    conn.client.sendMessage(b'{"jsonrpc":"2.0","method":"whoami","id":1}', isBinary=True)
    conn.settle()
    assert conn.client.received == []
    assert conn.client.closed is not None
    assert conn.client.remoteCloseCode == 1003
    assert conn.server.state == conn.server.STATE_CLOSED


def test_ws_oversized_message_closes_1009(txaio_clock):
    gateway = make_gateway(txaio_clock, max_message_size=1024)
    conn = connect(gateway)
    padding = "x" * 2000
    conn.client.sendMessage(json.dumps({"jsonrpc": "2.0", "method": "whoami", "id": 1, "pad": padding}).encode())
    conn.settle()
    assert conn.client.received == []
    assert conn.client.remoteCloseCode == 1009
    # a message under the limit on a fresh connection is fine
    other = connect(gateway)
    assert other.request("whoami")["result"]["circle"] == CIRCLE


def test_ws_fragmented_oversized_message_closes_1009(txaio_clock):
    conn = connect(make_gateway(txaio_clock, max_message_size=1024))
    conn.client.beginMessage(isBinary=False)
    for _ in range(4):
        conn.client.sendMessageFrame(b"[" * 400)
    conn.client.endMessage()
    conn.settle()
    assert conn.client.received == []
    assert conn.client.remoteCloseCode == 1009


def test_ws_play_output_too_large_is_answered_at_once(txaio_clock, runner):
    """Under the limit as text, over it once JSON-escaped (quotes double)."""
    conn = connect(make_gateway(txaio_clock, runner, max_message_size=4096))
    id_ = conn.client.call("play", {"script": "s"})
    conn.settle()
    runner.pending[0].callback('"' * 3000)
    conn.settle()
    [reply] = conn.client.received
    assert reply["id"] == id_ and reply["error"]["code"] == -32007
    as_sent = {"jsonrpc": "2.0", "result": {"output": '"' * 3000}, "id": id_}
    assert reply["error"]["data"] == {"size": len(json.dumps(as_sent, separators=(",", ":"))), "limit": 4096}
    assert conn.request("whoami")["result"]["circle"] == CIRCLE  # the connection lives on


def test_ws_batch_reply_over_the_limit_is_sent_within_it(txaio_clock):
    document_size = len(json.dumps(json.loads(OPENRPC.read_text("utf-8")), separators=(",", ":")))
    limit = document_size * 3
    conn = connect(make_gateway(txaio_clock, max_message_size=limit))
    batch = [{"jsonrpc": "2.0", "method": "rpc.discover", "id": f"{i}-" + "i" * 100} for i in range(10)]
    conn.client.sendMessage(json.dumps(batch).encode())
    conn.settle()
    [reply] = conn.client.received
    assert [r["id"] for r in reply] == [r["id"] for r in batch]
    assert sum("result" in r for r in reply) == 2
    assert {r["error"]["code"] for r in reply if "error" in r} == {-32007}
    assert conn.server.state == conn.server.STATE_OPEN


@pytest.mark.parametrize("late", [False, True])
def test_ws_reply_that_cannot_fit_closes_1009(txaio_clock, runner, late):
    """Even the error would be too large (the id alone is): close 1009, no traceback, no drop."""
    conn = connect(make_gateway(txaio_clock, runner, max_message_size=4096))
    huge_id = "i" * (4000 if late else 4040)  # the request fits; its error reply would not
    with captured_log() as events:
        if late:
            conn.client.call("play", {"script": "s"}, id_=huge_id)
            conn.settle()
            runner.pending[0].callback("o" * 200)
        else:
            conn.client.call("x", id_=huge_id)
        conn.settle()
    assert conn.client.received == []
    assert conn.client.remoteCloseCode == 1009
    assert conn.client.closed[0] is True  # a closing handshake, not a dropped TCP connection
    assert not [e for e in events if e.get("log_level") and e["log_level"].name in ("error", "critical")]


def test_ws_fragmented_request_is_answered_once_whole(txaio_clock):
    conn = connect(make_gateway(txaio_clock))
    text = json.dumps({"jsonrpc": "2.0", "method": "whoami", "id": "frag"}).encode()
    conn.client.beginMessage(isBinary=False)
    for i in range(0, len(text), 7):
        conn.client.sendMessageFrame(text[i:i + 7])
    conn.client.endMessage()
    conn.client.sendMessage(b'{"jsonrpc":"2.0","method":"whoami","id":"next"}')
    conn.settle()
    assert [r["id"] for r in conn.client.received] == ["frag", "next"]
    assert conn.client.received[0]["result"]["circle"] == CIRCLE


def test_ws_invalid_utf8_text_closes_1007(txaio_clock):
    conn = connect(make_gateway(txaio_clock))
    conn.client.sendMessage(b'{"jsonrpc":"2.0","method":"whoami","id":"\xff"}')
    conn.settle()
    assert conn.client.received == []
    assert conn.client.remoteCloseCode == 1007


def test_ws_hostile_messages_do_not_affect_other_clients(txaio_clock):
    gateway = make_gateway(txaio_clock)
    victim, attacker = connect(gateway), connect(gateway)
    attacker.client.sendMessage(b"[" * 100_000)
    attacker.client.sendMessage(b'{"jsonrpc":"2.0","method":"whoami","id":"\\ud800"}')
    attacker.settle()
    deep, surrogate = attacker.client.received
    assert deep["error"]["code"] == -32700
    assert surrogate["id"] == "\ud800" and surrogate["result"]["circle"] == CIRCLE
    assert attacker.request("whoami")["result"]["circle"] == CIRCLE  # still open
    assert victim.request("whoami")["result"]["circle"] == CIRCLE


def test_ws_reply_after_close_is_dropped(txaio_clock, runner):
    conn = connect(make_gateway(txaio_clock, runner))
    conn.client.call("play", ["s"])
    conn.settle()
    conn.client.sendClose(1000)
    conn.settle()
    assert conn.server.state == conn.server.STATE_CLOSED
    with captured_log() as events:
        runner.pending[0].callback("late")  # must not write to a closed transport or raise
    assert not [e for e in events if e.get("log_failure") is not None]


# --- the opening handshake ---------------------------------------------------------------------------


class Transport(StringTransport):
    def unregisterProducer(self):
        # Autobahn unregisters on every drop; a real TCP transport tolerates that.
        self.producer = None


def handshake(gateway, path: str) -> bytes:
    server = CircleFactory(session_layer(gateway)).buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
    transport = Transport()
    server.makeConnection(transport)
    server.dataReceived(
        (f"GET {path} HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode("ascii"))
    return transport.value()


def status(response: bytes) -> int:
    return int(response.split(b"\r\n", 1)[0].split(b" ")[1])


def test_handshake_accepts_a_served_circle(txaio_clock):
    gateway = make_gateway(txaio_clock, circles=[CIRCLE])
    assert status(handshake(gateway, f"/{CIRCLE}")) == 101
    assert status(handshake(gateway, f"/{CIRCLE}?x=1")) == 101


def test_handshake_refuses_an_unknown_circle_404(txaio_clock):
    gateway = make_gateway(txaio_clock, circles=[CIRCLE])
    assert status(handshake(gateway, f"/{OTHER_CIRCLE}")) == 404


def test_handshake_without_circle_list_accepts_any_valid_circle(txaio_clock):
    gateway = make_gateway(txaio_clock)
    assert status(handshake(gateway, f"/{OTHER_CIRCLE}")) == 101


@pytest.mark.parametrize("path", [
    "/", "/hello", "/openrpc.json", "/02" + "00" * 32, "/02" + "zz" * 32, "/0x" + "ab" * 32,
    "/" + CIRCLE[:-2], "/" + CIRCLE + "00", "/" + CIRCLE + "/x", "//" + CIRCLE,
])
def test_handshake_refuses_paths_that_are_not_circle_keys_404(txaio_clock, path):
    assert status(handshake(make_gateway(txaio_clock), path)) == 404


def test_handshake_accepts_the_uncompressed_key_of_a_circle(txaio_clock):
    """Clients of the Rust server often write the key uncompressed: the same circle."""
    key, other = Key(), Key()
    gateway = make_gateway(txaio_clock, circles=[key.pubkey])
    assert status(handshake(gateway, f"/{key.uncompressed}")) == 101
    assert status(handshake(gateway, f"/{key.pubkey}")) == 101
    assert status(handshake(gateway, f"/{other.uncompressed}")) == 404
    assert status(handshake(gateway, f"/{key.uncompressed[:-2]}")) == 404


def test_refused_handshake_through_a_client(txaio_clock):
    conn = connect(make_gateway(txaio_clock, circles=[CIRCLE]), f"/{OTHER_CIRCLE}")
    assert not conn.client.opened
    assert conn.client.closed is not None and conn.client.closed[0] is False
    assert "404" in (conn.client.wasNotCleanReason or "")


# --- anomalies are logged within bounds ---------------------------------------------------


def _info_or_worse(events) -> list:
    return [e for e in events if e.get("log_level") is not None and e["log_level"].name != "debug"]


def test_failed_authentications_log_a_few_lines_then_a_summary_at_close(txaio_clock):
    conn = connect(make_gateway(txaio_clock, rate_limit=0))
    key = Key()
    nonce = conn.request("fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    with captured_log() as events:
        for _ in range(200):
            conn.client.call("authenticate", {"pubkey": key.pubkey, "signature": Key().eth(nonce)})
        conn.settle()
        assert len(conn.client.received) == 201 and all(r["error"]["code"] == -32002 for r in conn.client.received[1:])
        assert len(_info_or_worse(events)) == 3
        conn.client.sendClose(1000)
        conn.settle()
    lines = _info_or_worse(events)
    assert len(lines) == 4
    assert lines[-1]["unlogged"] == 197 and lines[-1]["kinds"] == {"authentication failed": 197}


def test_refused_upgrades_log_a_few_lines_a_minute_then_a_summary(txaio_clock):
    factory = CircleFactory(session_layer(make_gateway(txaio_clock, circles=[CIRCLE])))

    def refused(path):
        server = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 8080))
        transport = Transport(peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
        server.makeConnection(transport)
        server.dataReceived(
            (f"GET {path} HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode("ascii"))
        return status(transport.value())

    level = txaio.get_global_log_level()
    txaio.set_global_log_level("info")  # Autobahn's own lines count too
    try:
        with captured_log() as events:
            assert {refused(f"/{OTHER_CIRCLE}") for _ in range(300)} == {404}
            assert len(_info_or_worse(events)) == 10
            txaio_clock.advance(60)
            assert refused("/nope") == 404
    finally:
        txaio.set_global_log_level(level)
    lines = _info_or_worse(events)
    assert len(lines) == 12  # 10, the window's summary, the next window's first
    summary = lines[10]
    assert summary["unlogged"] == 290 and summary["by_kind"] == {"404": 290}
    assert summary["busiest"] == {"192.0.2.7": 290}


# --- the Autobahn methods CircleProtocol trims ---------------------------------------------------

#: sha256 (first 16 hex digits) of the Autobahn source each override in circles/server/websocket.py
#: was written against. When Autobahn changes one, this fails: compare the new source with the
#: override, carry over what matters, and record the new digest. (Its timers on the injected
#: clock, through the factory's _batched_timer, are held by the ping-timeout tests below.)
AUTOBAHN_SOURCES = {
    ("WebSocketAdapterProtocol", "connectionMade"): "63ceb64088e44552",
    ("WebSocketAdapterProtocol", "connectionLost"): "cf4d8aab057cd161",
    ("WebSocketAdapterProtocol", "dataReceived"): "7997f762de218433",
    ("WebSocketServerProtocol", "_connectionMade"): "213dadb6d12d3d48",
    ("WebSocketServerProtocol", "_connectionLost"): "1b616e8fc259d995",
    ("WebSocketProtocol", "sendData"): "5dcca425b048b07e",
    ("WebSocketProtocol", "onMessageEnd"): "efff2a43ca8540d0",
    ("WebSocketProtocol", "onMessageBegin"): "1c5cb3b3e3eb227b",
    ("WebSocketProtocol", "onMessageFrameBegin"): "68c4eae4de95e1fb",
    ("WebSocketProtocol", "onMessageFrameData"): "23e4805e8f059816",
    ("WebSocketProtocol", "onMessageFrameEnd"): "00c94dd299eb55fc",
    ("WebSocketProtocol", "consumeData"): "aaa88196e762438f",
    ("WebSocketServerProtocol", "failHandshake"): "354c2c03cca517fb",
    ("WebSocketAdapterProtocol", "_closeConnection"): "17833f32dde140f0",  # closes in order over TLS
    ("WebSocketServerProtocol", "sendHttpErrorResponse"): "cea44d9c8accd7df",  # with a body
    # without the TLS channel binding; the opening handshake let go once open
    ("WebSocketAdapterProtocol", "_onOpen"): "6cfc286602a22405",
    ("ObservableMixin", "on"): "e9c238a6f0f5ecce",  # the dict of results made at the first listener
    # a short way for a whole text message in one frame, and for an unfragmented text reply
    ("WebSocketProtocol", "processData"): "25b9c1387a46ab25",
    ("WebSocketProtocol", "sendMessage"): "048d6bcf0d712309",
}
#: Copied, not overridden: into TrimmedServerProtocol.drop (less its warning), and into
#: TrimmedServerProtocol.__init__ (less what each idle connection held: futures, event lists).
COPIED_AUTOBAHN_SOURCES = {
    ("WebSocketProtocol", "dropConnection"): "149c74c9a251a7b1",
    ("WebSocketProtocol", "__init__"): "29655ac3c50223a3",
}
#: Neither overridden nor copied, but relied on as they are: ``_connectionMade`` sets the
#: attributes TrimmedServerProtocol keeps in slots (AUTOBAHN_STATE), its send queue and traffic
#: counters replaced just after; ``succeedHandshake`` fires ``is_open`` just after ``_onOpen``
#: (see TrimmedServerProtocol.is_open) and reads nothing of the handshake after it.
RELIED_ON_AUTOBAHN_SOURCES = {
    ("WebSocketProtocol", "_connectionMade"): "7ac58d8bb6c3c752",
    ("WebSocketServerProtocol", "succeedHandshake"): "fb43d387929cf206",
}


@pytest.mark.parametrize("owner, method", sorted(AUTOBAHN_SOURCES))
def test_trimmed_autobahn_methods_are_the_ones_reviewed(owner, method):
    from autobahn.twisted import websocket as twisted_websocket
    from autobahn.websocket import protocol as websocket_protocol

    cls = getattr(twisted_websocket, owner, None) or getattr(websocket_protocol, owner)
    assert source_digest(getattr(cls, method)) == AUTOBAHN_SOURCES[owner, method]
    overriding = [c for c in CircleFactory(session_layer(make_gateway(Clock()))).protocol.__mro__ if c.__module__.startswith("circles.")]
    assert any(method in c.__dict__ for c in overriding)  # still overridden


@pytest.mark.parametrize("owner, method", sorted(COPIED_AUTOBAHN_SOURCES))
def test_copied_autobahn_methods_are_the_ones_reviewed(owner, method):
    from autobahn.websocket import protocol as websocket_protocol

    source = getattr(getattr(websocket_protocol, owner), method)
    assert source_digest(source) == COPIED_AUTOBAHN_SOURCES[owner, method]


@pytest.mark.parametrize("owner, method", sorted(RELIED_ON_AUTOBAHN_SOURCES))
def test_autobahn_methods_relied_on_are_the_ones_reviewed(owner, method):
    from autobahn.websocket import protocol as websocket_protocol

    source = getattr(getattr(websocket_protocol, owner), method)
    assert source_digest(source) == RELIED_ON_AUTOBAHN_SOURCES[owner, method]


def test_a_client_that_stops_answering_pings_is_dropped_ping_timeout_after_the_ping(txaio_clock):
    """--ping-timeout is what it says. Autobahn's timers truncate deadlines to the whole
    second; with one more second added to make up for that, the drop came between 3 and 4 s after
    the ping for a --ping-timeout of 3. Driven by the clock: a ping at --ping-interval, the drop
    exactly --ping-timeout after it."""
    gateway = make_gateway(txaio_clock, circles=[CIRCLE], ping_interval=10, ping_timeout=3, idle_timeout=0)
    factory = CircleFactory(session_layer(gateway))
    conn = Connection(factory, f"/{CIRCLE}", txaio_clock)
    assert conn.client.opened and len(factory.open_connections) == 1
    pings: list = []
    conn.client.onPing = pings.append  # this client never answers (Autobahn's onPing would pong)
    txaio_clock.advance(10)
    conn.pump.flush()
    assert len(pings) == 1
    txaio_clock.advance(2.99)
    conn.pump.flush()
    assert conn.client.closed is None and len(factory.open_connections) == 1
    txaio_clock.advance(0.02)
    conn.pump.flush()
    assert len(factory.open_connections) == 0 and conn.client.closed is not None
    assert conn.server.wasNotCleanReason == "WebSocket ping timeout (peer did not respond with pong in time)"


# --- nonces of the shared store (GET /auth/nonce's) in authenticate ---------------------------------
#
# The gateway's shared store here is the one a server without Redis has: its process's memory.
# A nonce is a nonce wherever it was fetched: one from GET /auth/nonce (bound to no session)
# authenticates at the URL or by authenticate on any session; one from fetch_nonce, in its session.


def http_nonce(gateway, key: Key | None = None) -> str:
    """A nonce as GET /auth/nonce issues it (for ``key``, or for any)."""
    return fired(gateway.http_nonces.issue(None if key is None else key.pubkey, "192.0.2.7")).value


def proof(key: Key, nonce: str, **more) -> dict:
    return {"pubkey": key.pubkey, "signature": key.eth(nonce), "nonce": nonce, **more}


DELAY = 1.0


@implementer(INonceStore)
class SlowStore:
    """The shared store as Redis is to a session: it answers ``DELAY`` seconds later (by the test's
    clock), or fails with ``failure``. A stand-in: a unit test runs no redis-server (the
    integration tests, tests/integration/test_shared_nonces.py, use a real one)."""

    def __init__(self, gateway, failure: Exception | None = None) -> None:
        self.clock = gateway.clock
        self.store = gateway.http_nonces
        self.failure = failure
        self.asked = 0

    def issue(self, pubkey=None, owner=None):
        return self.store.issue(pubkey, owner)

    def redeem_value(self, value, pubkey, signature):
        self.asked += 1
        answer = self.store.redeem_value(value, pubkey, signature) if self.failure is None else fail(self.failure)
        return deferLater(self.clock, DELAY, lambda: answer)

    def live(self):
        return self.store.live()


def test_an_http_nonce_authenticates_any_session_once(clock):
    gateway = make_gateway(clock)
    first, second = open_session(gateway, CIRCLE), open_session(gateway, CIRCLE)
    key = Key()
    nonce = http_nonce(gateway, key)
    assert rpc(first, "authenticate", proof(key, nonce))["result"] == {"authenticated": True, "pubkey": key.pubkey}
    assert rpc(first, "whoami")["result"] == {"circle": CIRCLE, "authenticated": True, "pubkey": key.pubkey}
    for session in (first, second):  # single use, on whichever session
        reply = rpc(session, "authenticate", proof(key, nonce))
        assert error_code(reply) == -32002 and "nonce unknown, used or expired" in reply["error"]["message"]
    assert rpc(second, "whoami")["result"]["authenticated"] is False
    counted = gateway.metrics.registry.get_sample_value
    assert [counted("circles_authentications_total", {"result": result}) for result in ("success", "failure")] == [
        1, 2]
    # nor does a URL take it now
    url = f"/{CIRCLE}?pubkey={key.pubkey}&sig={key.eth(nonce)}&nonce={nonce}"
    assert status(handshake(gateway, url)) == 401


def test_an_http_nonce_bound_to_another_key_is_refused_and_used_up(clock):
    gateway = make_gateway(clock)
    session = open_session(gateway, CIRCLE)
    alice, bob = Key(), Key()
    nonce = http_nonce(gateway, alice)
    reply = rpc(session, "authenticate", proof(bob, nonce))
    assert error_code(reply) == -32002 and "issued for another public key" in reply["error"]["message"]
    # Any attempt uses a shared nonce up (unlike a session's own): a captured proof is no use later.
    assert error_code(rpc(session, "authenticate", proof(alice, nonce))) == -32002
    assert rpc(session, "whoami")["result"]["authenticated"] is False
    # Without a pubkey, the key it was issued for is the one the signature must prove.
    nonce = http_nonce(gateway, alice)
    assert error_code(rpc(session, "authenticate", {"signature": bob.eth(nonce), "nonce": nonce})) == -32002
    nonce = http_nonce(gateway, alice)
    assert rpc(session, "authenticate", {"signature": alice.der(nonce), "nonce": nonce})["result"]["pubkey"] == \
        alice.pubkey


def test_an_unbound_http_nonce_serves_the_key_a_personal_sign_recovers(clock):
    gateway = make_gateway(clock)
    session = open_session(gateway, CIRCLE)
    key = Key()
    nonce = http_nonce(gateway)
    assert rpc(session, "authenticate", {"signature": key.eth(nonce), "nonce": nonce})["result"] == {
        "authenticated": True, "pubkey": key.pubkey}


def test_an_expired_http_nonce_is_refused(clock):
    gateway = make_gateway(clock)
    session = open_session(gateway, CIRCLE)
    key = Key()
    nonce = http_nonce(gateway, key)
    clock.advance(TTL - 1)
    live = http_nonce(gateway, key)
    clock.advance(1)
    reply = rpc(session, "authenticate", proof(key, nonce))
    assert error_code(reply) == -32002 and "nonce unknown, used or expired" in reply["error"]["message"]
    assert rpc(session, "authenticate", proof(key, live))["result"]["authenticated"] is True


def test_a_session_nonce_is_redeemed_in_the_session_without_asking_the_shared_store(clock):
    """The hot path: fetch_nonce and authenticate with the session's own nonce answer at once."""
    gateway = make_gateway(clock)
    gateway.http_nonces = slow = SlowStore(gateway)
    session = open_session(gateway, CIRCLE)
    key = Key()
    for named in (True, False):
        text = session.answer(json.dumps({"jsonrpc": "2.0", "method": "fetch_nonce", "params": [key.pubkey], "id": 1}))
        nonce = json.loads(text)["result"]["nonce"]
        params = proof(key, nonce) if named else {"pubkey": key.pubkey, "signature": key.eth(nonce)}
        text = session.answer(json.dumps({"jsonrpc": "2.0", "method": "authenticate", "params": params, "id": 2}))
        assert isinstance(text, str) and json.loads(text)["result"]["pubkey"] == key.pubkey
    assert slow.asked == 0


@pytest.mark.parametrize("value", ["x" * 32, "A" * 32, "0" * 31, "0" * 33, "", "0" * 31 + "\n", "n" * 10_000])
def test_a_value_not_of_the_nonce_form_is_refused_without_asking_the_shared_store(clock, value):
    gateway = make_gateway(clock)
    gateway.http_nonces = slow = SlowStore(gateway)
    session = open_session(gateway, CIRCLE)
    key = Key()
    text = session.answer(json.dumps({"jsonrpc": "2.0", "method": "authenticate", "id": 1,
                                      "params": {"pubkey": key.pubkey, "signature": key.eth(value), "nonce": value}}))
    assert isinstance(text, str)  # answered at once
    reply = json.loads(text)
    assert error_code(reply) == -32002 and "nonce unknown, used or expired" in reply["error"]["message"]
    assert slow.asked == 0


def test_the_rate_limit_counts_authenticate_with_an_http_nonce(clock):
    gateway = make_gateway(clock, rate_limit=1, rate_burst=1)
    session = open_session(gateway, CIRCLE)
    key = Key()
    first, second = http_nonce(gateway, key), http_nonce(gateway, key)
    assert rpc(session, "authenticate", proof(key, first))["result"]["authenticated"] is True
    assert error_code(rpc(session, "authenticate", proof(key, second))) == -32006
    assert gateway.http_nonces.holds(second)  # refused before the store was asked: still there
    clock.advance(1)
    assert rpc(session, "authenticate", proof(key, second))["result"]["authenticated"] is True


def test_a_shared_store_that_cannot_answer_is_backend_unavailable(clock):
    gateway = make_gateway(clock)
    nonce = http_nonce(gateway, Key())
    gateway.http_nonces = SlowStore(gateway, BackendUnavailable("Redis did not answer within 5s"))
    session = open_session(gateway, CIRCLE)
    key = Key()
    d = session.answer(json.dumps({"jsonrpc": "2.0", "method": "authenticate", "params": proof(key, nonce), "id": 1}))
    assert not d.called
    clock.advance(DELAY)
    reply = json.loads(fired(d))
    assert reply["error"] == {"code": -32004, "message": "Nonce store unavailable, retry later",
                              "data": "Redis did not answer within 5s"}
    assert rpc(session, "whoami")["result"]["authenticated"] is False
    assert session.in_flight == 0


def test_a_batch_waits_for_an_authenticate_that_waits_for_the_shared_store(clock, runner):
    """The calls after it in the batch start once it has answered: the play runs as its key."""
    gateway = make_gateway(clock, runner, auth_required=True)
    gateway.http_nonces = SlowStore(gateway)
    session = open_session(gateway, CIRCLE)
    key = Key()
    nonce = http_nonce(gateway, key)
    batch = [{"jsonrpc": "2.0", "method": "whoami", "id": 0},
             {"jsonrpc": "2.0", "method": "authenticate", "params": proof(key, nonce), "id": 1},
             {"jsonrpc": "2.0", "method": "whoami", "id": 2},
             {"jsonrpc": "2.0", "method": "play", "params": ["s"], "id": 3}]
    d = session.answer(json.dumps(batch))
    assert session.proving is not None and runner.requests == []
    clock.advance(DELAY)
    assert session.proving is None
    assert [r.caller for r in runner.requests] == [key.pubkey]
    runner.pending[0].callback("out")
    replies = json.loads(fired(d))
    assert [r["id"] for r in replies] == [0, 1, 2, 3]
    assert replies[0]["result"]["authenticated"] is False
    assert replies[1]["result"] == {"authenticated": True, "pubkey": key.pubkey}
    assert replies[2]["result"]["authenticated"] is True
    assert replies[3]["result"] == {"output": "out"}


def test_a_closed_session_stops_waiting_for_the_shared_store_and_starts_nothing_after(clock, runner):
    gateway = make_gateway(clock, runner)
    gateway.http_nonces = SlowStore(gateway)
    session = open_session(gateway, CIRCLE)
    key = Key()
    batch = [{"jsonrpc": "2.0", "method": "authenticate", "params": proof(key, http_nonce(gateway, key)), "id": 1},
             {"jsonrpc": "2.0", "method": "play", "params": ["s"], "id": 2}]
    d = session.answer(json.dumps(batch))
    session.close()
    assert fired(d) is None  # nobody is left to answer
    clock.advance(DELAY)
    assert runner.requests == [] and session.in_flight == 0 and session.pubkey is None


def test_ws_requests_after_an_authenticate_wait_for_the_shared_store(txaio_clock, runner):
    """Sent back to back: the whoami and the play after the authenticate are taken once it is
    answered, in order, as the key it proved."""
    gateway = make_gateway(txaio_clock, runner, auth_required=True, circles=[CIRCLE])
    gateway.http_nonces = SlowStore(gateway)
    conn = connect(gateway)
    key = Key()
    nonce = http_nonce(gateway, key)
    ids = [conn.client.call("authenticate", proof(key, nonce)), conn.client.call("whoami"),
           conn.client.call("play", ["s"])]
    conn.settle()
    assert conn.client.received == [] and runner.requests == []
    assert conn.server.holding()
    txaio_clock.advance(DELAY)
    conn.settle()
    assert not conn.server.holding()
    assert [r["id"] for r in conn.client.received] == ids[:2]
    assert conn.client.received[0]["result"] == {"authenticated": True, "pubkey": key.pubkey}
    assert conn.client.received[1]["result"]["authenticated"] is True
    assert [r.caller for r in runner.requests] == [key.pubkey]
    # A session nonce on the same connection answers at once, as ever.
    fetched = conn.request("fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    assert conn.request("authenticate", proof(key, fetched))["result"]["authenticated"] is True


def test_a_session_nonce_is_bound_to_its_session_a_url_refuses_it(txaio_clock):
    """The other direction: fetch_nonce's nonce is bound to the connection that asked for it, so
    neither a URL (401) nor another connection's authenticate (-32002) takes it; its own does."""
    gateway = make_gateway(txaio_clock, circles=[CIRCLE])
    conn, other = connect(gateway), connect(gateway)
    key = Key()
    nonce = conn.request("fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    url = f"/{CIRCLE}?pubkey={key.pubkey}&sig={key.eth(nonce)}&nonce={nonce}"
    response = handshake(gateway, url)
    assert status(response) == 401 and b"nonce unknown, used or expired" in response
    assert error_code(other.request("authenticate", proof(key, nonce))) == -32002
    assert conn.request("authenticate", proof(key, nonce))["result"]["authenticated"] is True


# --- what an idle connection keeps, and its timers ---------------------------------------------------

STEP = 1 / 64  # a binary fraction: the clock's sums stay exact to well under it


def test_an_idle_connection_is_closed_idle_timeout_after_its_last_message(txaio_clock):
    """The idle timeout is one lane of timers for every connection (one call of the clock), and
    still exact for each: the close comes --idle-timeout after the last message, not before."""
    gateway = make_gateway(txaio_clock, circles=[CIRCLE], idle_timeout=60, ping_interval=0)
    factory = CircleFactory(session_layer(gateway))
    conn, other = Connection(factory, f"/{CIRCLE}", txaio_clock), Connection(factory, f"/{CIRCLE}", txaio_clock)
    assert len(factory.open_connections) == 2
    # both idle timeouts behind one call (the opening handshake's lane keeps its own until it comes, at 10 s)
    assert len([call for call in txaio_clock.getDelayedCalls() if call.getTime() - txaio_clock.seconds() > 30]) == 1
    conn.client.call("whoami")
    conn.pump.flush()
    txaio_clock.advance(30)
    conn.client.call("whoami")  # the last message: idle from here
    conn.pump.flush()
    assert len(conn.client.received) == 2
    txaio_clock.advance(60 - STEP)
    conn.pump.flush()
    other.pump.flush()
    assert other.client.closed is not None and other.client.closed[1] == 1000  # idle since it opened
    assert conn.client.closed is None and conn.server.state == conn.server.STATE_OPEN
    txaio_clock.advance(2 * STEP)
    conn.pump.flush()
    assert conn.client.closed == (True, 1000, "idle timeout")
    assert factory.open_connections == set()


def test_an_open_connection_keeps_no_instance_dict_and_not_its_handshake(txaio_clock):
    """Autobahn's state is in slots (an instance dict was 1.6 kB a connection), and what the
    opening handshake left (the request's head, raw and parsed, the response) is let go once open."""
    conn = connect(make_gateway(txaio_clock))
    assert conn.request("whoami")["result"]["circle"] == CIRCLE
    server = conn.server
    assert vars(server) == {}
    assert server.http_headers is None and server.http_request_data is None and server.http_response_data is None
    assert server.websocket_protocol_in_use is None  # the subprotocol chosen stays
    assert server.send_queue == () and server.trafficStats is server.factory.traffic


def test_is_open_and_is_closed_fire_as_autobahns_do(txaio_clock):
    gateway = make_gateway(txaio_clock)
    factory = CircleFactory(session_layer(gateway))
    early = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
    waited = early.is_open  # asked before the connection opens: fires as it opens
    transport = Transport()
    early.makeConnection(transport)
    assert not waited.called
    early.dataReceived(
        (f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode("ascii"))
    assert waited.called and early.is_open is waited
    conn = connect(gateway)  # nobody asked before it opened: asked now, it has fired
    assert fired(conn.server.is_open) is None and fired(conn.server.is_open) is None
    closed = conn.server.is_closed
    assert not closed.called
    conn.client.sendClose(1000)
    conn.settle()
    assert fired(closed) is conn.server
