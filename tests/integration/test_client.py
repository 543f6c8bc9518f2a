"""circles.client against the real server: TLS (a trustme CA), both signature forms, play
through a reference worker and Redis, many calls in flight, errors, connection loss, reconnect.
(The client on its own: tests/unit/test_client.py.)"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults, maybeDeferred
from twisted.logger import formatEvent

from circles import CirclesService, Config
from circles.backend.redis_url import parse_redis_url
from circles.client import (
    CertificateNotVerified,
    ConnectFailed,
    ConnectionClosed,
    NoServerReachable,
    ReconnectingClient,
    RPCError,
    connect,
)
from circles.client.signing import generate, public_key, sign_nonce
from circles.server import tls
from circles.worker.service import Worker
from circles.worker.tiny_engine import run as tiny_engine
from devtools.redis_server import free_port

from ..inmemory import captured_log
from ..play_client import eventually, sleep
from ..support import ROOT, Key
from ..unit.test_client import CIRCLE, CIRCLE_KEY, IDLE, slammer, url  # noqa: F401 (slammer: a fixture)


@pytest_twisted.async_yield_fixture
async def server(redis_server, tls_files):
    """A TLS server (auth on) and a worker running the tiny engine; yields the port."""
    service = CirclesService(Config(circles=[CIRCLE, IDLE], auth_required=True, tls=tls.load(tls_files["cert"], tls_files["key"]),
                                    listen=(), port=0, interface="127.0.0.1", redis_url=redis_server.url),
                             reactor=reactor)
    worker = Worker(parse_redis_url(redis_server.url), [CIRCLE], tiny_engine, reactor=reactor, concurrency=4)
    service.startService()
    worker.startService()
    [port] = await service.when_listening()
    await eventually(service.script_runner.is_connected)
    await eventually(lambda: worker._connected)
    yield port.getHost().port
    await maybeDeferred(worker.stopService)
    await maybeDeferred(service.stopService)


@pytest_twisted.async_yield_fixture
async def second_server(server, redis_server, tls_files):
    """Another server process of the same deployment (same Redis, same circles): stands for a
    second host; yields ``(port, service)`` so a test may stop it."""
    service = CirclesService(Config(circles=[CIRCLE, IDLE], auth_required=True, tls=tls.load(tls_files["cert"], tls_files["key"]),
                                    listen=(), port=0, interface="127.0.0.1", redis_url=redis_server.url),
                             reactor=reactor)
    service.startService()
    [port] = await service.when_listening()
    await eventually(service.script_runner.is_connected)
    yield port.getHost().port, service
    if service.running:
        await maybeDeferred(service.stopService)


@pytest_twisted.ensureDeferred
async def test_authenticate_both_forms_and_play(server, tls_files):
    for scheme in ("eth", "ecdsa"):
        user = generate()
        client = await connect(url(server), reactor=reactor, ca=tls_files["ca"])
        try:
            assert await client.whoami() == {"circle": CIRCLE, "authenticated": False, "pubkey": None}
            result = await client.authenticate(user, scheme=scheme)
            assert result == {"authenticated": True, "pubkey": public_key(user)}
            assert (await client.whoami())["pubkey"] == public_key(user)
            output = await client.play('print(CONTEXT_ID); CALLER_ID + " " + 6 * 7')
            assert output == f"{CIRCLE}\n{public_key(user)} 42"
        finally:
            await client.close()
    assert not client.connected


@pytest_twisted.ensureDeferred
async def test_errors_are_rpc_errors_with_code_message_data(server, tls_files):
    client = await connect(url(server, host="127.0.0.1"), reactor=reactor, ca=tls_files["ca"])
    with pytest.raises(RPCError) as refused:
        await client.play("1")
    assert refused.value.code == -32001 and "Authentication required" in refused.value.message
    # A signature for a nonce this connection never asked for
    with pytest.raises(RPCError) as failed:
        await client.call("authenticate", {"pubkey": public_key(CIRCLE_KEY), "signature": sign_nonce(CIRCLE_KEY, "x" * 32)})
    assert failed.value.code == -32002
    await client.authenticate(generate())
    with pytest.raises(RPCError) as script:
        await client.play("1 / 0")
    assert (script.value.code, script.value.message, script.value.data) == (-32005, "Script failed", "line 1, column 3: division by zero")
    assert "division by zero" in str(script.value)
    with pytest.raises(RPCError) as timed_out:
        await client.call("nope")
    assert timed_out.value.code == -32601 and timed_out.value.data is None
    with open(ROOT / "openrpc.json") as f:
        assert await client.discover() == json.load(f)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_many_calls_in_flight_are_matched_by_id(server, tls_files):
    client = await connect(url(server), reactor=reactor, ca=tls_files["ca"])
    await client.authenticate(generate(), scheme="ecdsa")
    outputs = await gatherResults([client.play(f"{i} * 2") for i in range(40)] + [client.whoami()])
    assert outputs[:40] == [f"{i * 2}" for i in range(40)]
    assert outputs[40]["authenticated"] is True
    await client.close()


@pytest_twisted.ensureDeferred
async def test_tls_is_verified_by_default(server, tls_files):
    # The system's trust store does not know the test CA.
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        await connect(url(server), reactor=reactor)
    # A name the certificate does not carry is refused even with the right CA.
    with pytest.raises(ConnectFailed):
        await connect(url(server, host="127.0.0.2"), reactor=reactor, ca=tls_files["ca"])
    # --insecure, for development, accepts anything.
    client = await connect(url(server), reactor=reactor, insecure=True)
    assert (await client.whoami())["circle"] == CIRCLE
    await client.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_or_unknown_circle(server, tls_files):
    with pytest.raises(ConnectFailed, match="404") as refused:
        await connect(url(server, public_key(generate())), reactor=reactor, ca=tls_files["ca"])
    assert refused.value.status == 404 and "does not serve circle" in str(refused.value)
    with pytest.raises(CertificateNotVerified, match="unable to get local issuer certificate"):
        await connect(url(server), reactor=reactor)  # the system's trust store does not know the test CA
    with pytest.raises(ConnectFailed, match="names no circle"):  # said before connecting
        await connect(url(server, ""), reactor=reactor, ca=tls_files["ca"])
    with pytest.raises(ConnectFailed, match="cannot open"):
        await connect(f"ws://127.0.0.1:1/{CIRCLE}", reactor=reactor)
    with pytest.raises(ConnectFailed):
        await connect("http://example.invalid/", reactor=reactor)


@pytest_twisted.ensureDeferred
async def test_connection_loss_fails_pending_calls(server, tls_files):
    client = await connect(url(server, IDLE), reactor=reactor, ca=tls_files["ca"])
    await client.authenticate(generate())
    pending = [client.play("1", timeout=25), client.play("2", timeout=25)]
    await client.whoami()  # both plays are queued at the server by now
    client._protocol.transport.abortConnection()  # the network goes away
    results = await DeferredList(pending, consumeErrors=True)
    for ok, failure in results:
        assert not ok and failure.check(ConnectionClosed)
        assert "before the reply to play arrived" in failure.getErrorMessage()
    with pytest.raises(ConnectionClosed):
        await client.whoami()


@pytest_twisted.ensureDeferred
async def test_reconnecting_client_authenticates_each_connection(server, tls_files):
    user = Key()
    helper = ReconnectingClient(url(server), reactor=reactor, key=user.private.secret, ca=tls_files["ca"],
                                retry_policy=lambda attempt: 0.1)
    helper.start()
    try:
        first = await helper.client()
        assert await helper.whoami() == {"circle": CIRCLE, "authenticated": True, "pubkey": user.pubkey}
        first._protocol.transport.abortConnection()
        await first.when_closed()
        # The next call waits for a new connection, authenticated with a fresh nonce.
        assert await helper.play("CALLER_ID") == user.pubkey
        second = await helper.client()
        assert second._protocol is not first._protocol
    finally:
        await helper.stop()


@pytest_twisted.ensureDeferred
async def test_authenticate_without_pubkey_recovers_it_from_personal_sign(server, tls_files):
    """What the playground does: wallets give addresses, not keys."""
    user = generate()
    client = await connect(url(server), reactor=reactor, ca=tls_files["ca"])
    nonce = (await client.fetch_nonce())["nonce"]
    with pytest.raises(RPCError, match="needs the public key") as refused:
        await client.call("authenticate", {"signature": sign_nonce(user, nonce, "ecdsa")})
    assert refused.value.code == -32002
    result = await client.call("authenticate", {"signature": sign_nonce(user, nonce, "eth")})
    assert result == {"authenticated": True, "pubkey": public_key(user)}
    # A nonce bound to a key is not redeemed by a signature naming no key.
    nonce = (await client.fetch_nonce(public_key(user)))["nonce"]
    with pytest.raises(RPCError):
        await client.call("authenticate", {"signature": sign_nonce(user, nonce)})
    await client.close()


@pytest_twisted.ensureDeferred
async def test_reconnecting_client_moves_on_to_the_next_server(server, second_server, tls_files):
    """A deployment without a load balancer: when the client's server stops, it goes on over the other."""
    other, other_service = second_server
    user = Key()
    helper = ReconnectingClient([url(other), url(server)], reactor=reactor, key=user.private.secret,
                                ca=tls_files["ca"], retry_policy=lambda attempt: 0.05)
    assert helper.urls == [url(other), url(server)]
    helper.start()
    try:
        first = await helper.client()
        assert helper.url == first.url == url(other)
        assert await helper.play("CALLER_ID") == user.pubkey
        await maybeDeferred(other_service.stopService)  # the server "dies" (closes with 1001)
        await first.when_closed()
        assert await helper.play("CALLER_ID") == user.pubkey  # over the other server, authenticated anew
        second = await helper.client()
        assert helper.url == second.url == url(server)
        assert await helper.whoami() == {"circle": CIRCLE, "authenticated": True, "pubkey": user.pubkey}
    finally:
        await helper.stop()


@pytest_twisted.ensureDeferred
async def test_reconnecting_client_in_flight_call_fails_once(server, second_server, tls_files):
    other, _ = second_server
    helper = ReconnectingClient([url(other, IDLE), url(server, IDLE)], reactor=reactor, key=generate(),
                                ca=tls_files["ca"], retry_policy=lambda attempt: 0.05)
    helper.start()
    try:
        first = await helper.client()
        pending = helper.play("1", timeout=25)  # nobody serves IDLE: it waits
        await helper.whoami()  # the play is queued at the server by now
        first._protocol.transport.abortConnection()
        with pytest.raises(ConnectionClosed, match="before the reply to play arrived"):
            await pending
        assert (await helper.whoami())["circle"] == IDLE
        assert helper.url == url(server, IDLE)
    finally:
        await helper.stop()


@pytest_twisted.ensureDeferred
async def test_reconnecting_client_rotates_round_robin(server, second_server, tls_files):
    other, _ = second_server
    dead = f"wss://localhost:{free_port()}/{CIRCLE}"  # nothing listens: a failed attempt moves on too
    urls = [url(server), dead, url(other)]
    helper = ReconnectingClient(urls, reactor=reactor, ca=tls_files["ca"], retry_policy=lambda attempt: 0.01)
    assert helper.url == url(server)  # before the first attempt: the first URL
    helper.start()
    seen = []
    try:
        for _ in range(4):
            client = await helper.client()
            seen.append(client.url)
            assert helper.url == client.url
            assert (await client.whoami())["circle"] == CIRCLE
            client._protocol.transport.abortConnection()
            await client.when_closed()
            await sleep(0)
    finally:
        await helper.stop()
    assert seen == [url(server), url(other), url(server), url(other)]


# -- servers that close before the WebSocket opens, or cannot be reached -------------------------
# (the slammer, and what needs no TLS nor waiting out a timeout: tests/unit/test_client.py)

def _unhandled(events: list) -> list:
    """The events of ``events`` that carry a failure: an error nobody handled, logged by Twisted
    (``log_failure``; ``failure`` as the reactor's legacy ``log.err`` logs it)."""
    failures = [(e, e.get("log_failure") or e.get("failure")) for e in events]
    return [formatEvent(e) + "\n" + f.getTraceback() for e, f in failures if f is not None]


@pytest.mark.parametrize("scheme", ["ws", "wss"])
@pytest_twisted.ensureDeferred
async def test_reconnecting_client_survives_servers_that_close_before_the_websocket_opens(slammer, tls_files, scheme):
    """Twisted's ClientService logged ``Unhandled Error ... NoTransition ... _clientDisconnected
    in Waiting`` each time: the connection's loss failed the preparation (Connecting -> Waiting),
    then reported itself again to a state with no way out."""
    target = f"{scheme}://127.0.0.1:{slammer.port}/{CIRCLE}"
    helper = ReconnectingClient(target, reactor=reactor, key=generate(), retry_policy=lambda attempt: 0.01,
                                **({"insecure": True} if scheme == "wss" else {}))
    with captured_log() as events:
        helper.start()
        try:
            await eventually(lambda: slammer.accepted >= 5)
        finally:
            await helper.stop()
    assert _unhandled(events) == []
    assert any("closed before the WebSocket opened" in formatEvent(e) or "connecting to" in formatEvent(e)
               for e in events), [formatEvent(e) for e in events]


@pytest.mark.parametrize("kind", ["refused", "closes-at-once", "both"])
@pytest_twisted.ensureDeferred
async def test_play_timeout_covers_waiting_for_a_server(slammer, kind):
    """``play(timeout=...)`` on a client that reaches no server waited for ever; it fails within
    its timeout, saying that no server was reachable and why."""
    refused = f"ws://127.0.0.1:{free_port()}/{CIRCLE}"  # nothing listens there
    closes = f"ws://127.0.0.1:{slammer.port}/{CIRCLE}"
    urls = {"refused": [refused], "closes-at-once": [closes], "both": [refused, closes]}[kind]
    helper = ReconnectingClient(urls, reactor=reactor, key=generate(), retry_policy=lambda attempt: 0.01)
    with captured_log() as events:
        helper.start()
        try:
            pending = helper.play("1", timeout=2)
            with pytest.raises(NoServerReachable) as failed:
                await pending.addTimeout(60, reactor)  # a guard for this test only: it waited for ever
        finally:
            await helper.stop()
    message = str(failed.value)
    assert message.startswith("no server was reachable within 2 s ("), message
    if kind in ("refused", "both"):
        assert refused in message and "refused" in message.lower(), message
    if kind in ("closes-at-once", "both"):
        assert closes in message and "closed before the WebSocket opened" in message, message
    assert isinstance(failed.value, ConnectFailed)  # what callers already catch for a failed connection
    assert _unhandled(events) == []
