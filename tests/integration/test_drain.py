"""Stopping without dropping anyone: the drain grace of ``stopService`` (what
SIGTERM runs), and :class:`~circles.client.ReconnectingClient` meeting a server going away (1001).

A whole rolling upgrade behind a real load balancer is tests/integration/test_haproxy.py.
"""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor

from circles.backend.redis_url import parse_redis_url
from circles.client import ConnectionClosed, NoServerReachable, ReconnectingClient
from circles.client.signing import generate

from ..play_client import RPCClient, eventually, sleep
from .test_ops import _get
from .test_play_ws import CIRCLE, play, serve, serving, sh_worker


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest_twisted.ensureDeferred
async def test_stop_is_unready_at_once_and_keeps_serving_for_the_drain_grace(redis_server, start):
    """Once a load balancer has asked /ready: a stop answers /ready 503 at once, yet the port
    still accepts and serves (a new WebSocket, a play) for the grace; then it closes, and the
    open connections are told 1001 once their plays are answered."""
    service, port = await serve(start, redis_server.url, drain_grace=2.0, shutdown_grace=30)
    await serving(start(sh_worker(parse_redis_url(redis_server.url), concurrency=4)))
    base = f"http://127.0.0.1:{port}"
    assert (await _get(base + "/ready"))[0] == 200  # a balancer watches
    old = await RPCClient.open(port, CIRCLE)
    stopped = service.stopService()
    status, _, body = await _get(base + "/ready")
    assert (status, json.loads(body)["reason"]) == (503, "shutting down")
    new = await RPCClient.open(port, CIRCLE)  # still accepting
    assert (await play(new, "echo during the grace"))["result"]["output"] == "during the grace"
    in_flight = play(old, "sleep 1; echo finished")
    assert not stopped.called
    await eventually(lambda: _refused(port), timeout=10)  # the grace is over
    assert (await in_flight)["result"]["output"] == "finished"  # answered where it ran
    await stopped
    assert (old.closed_code, new.closed_code) == (1001, 1001)


@pytest_twisted.ensureDeferred
async def test_no_grace_when_nothing_watches_ready(redis_server, start):
    """Nobody asked /ready (no balancer, a developer's Ctrl-C): the port closes at once."""
    service, port = await serve(start, redis_server.url, drain_grace=30.0)
    stopped = service.stopService()
    await eventually(lambda: _refused(port), timeout=5)
    await stopped


@pytest_twisted.ensureDeferred
async def test_reconnecting_client_repeats_reads_but_never_a_play_on_going_away(redis_server, start, tmp_path):
    """A call that crosses the server's 1001 close frame is not taken by the server. ``whoami``
    (which only reads) is made again on the next connection without an error; a ``play`` fails
    with ConnectionClosed (code 1001), for the caller to decide: it is never repeated for it,
    and it did not run."""
    service, port = await serve(start, redis_server.url)
    await serving(start(sh_worker(parse_redis_url(redis_server.url))))
    client = ReconnectingClient(f"ws://127.0.0.1:{port}/{CIRCLE}", reactor=reactor, key=generate(),
                                retry_policy=lambda attempt: 0.1)
    client.start()
    try:
        await client.client()
        # The close frame and the call cross: both are sent before either side reads.
        service.factory.drain()
        service.factory.draining = False  # the next connection is served as usual
        assert (await client.whoami())["authenticated"] is True
        assert client.connections == 2

        await client.client()
        service.factory.drain()
        service.factory.draining = False
        ran = tmp_path / "ran"
        with pytest.raises(ConnectionClosed) as caught:
            await client.play(f"echo ran > {ran}", timeout=5)
        assert (caught.value.code, caught.value.sent) == (1001, True)
        # Not run: the next play, on the next connection, runs after any it could have queued.
        assert await client.play("echo next", timeout=5) == "next"
        assert not ran.exists()
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_reconnecting_client_comes_back_at_once_after_going_away_but_never_loops(redis_server, start):
    """A settled connection told 1001 is replaced at once (not after the retry policy's delay);
    one told 1001 before it settled waits that delay, so a server that lets clients in only to
    send them away is not hammered."""
    service, port = await serve(start, redis_server.url)
    client = ReconnectingClient(f"ws://127.0.0.1:{port}/{CIRCLE}", reactor=reactor,
                                retry_policy=lambda attempt: 30.0)  # a delay no test waits for
    client.SETTLED = 0.2
    client.start()
    try:
        await client.client()
        await sleep(0.3)  # settled
        service.factory.drain()
        service.factory.draining = False
        await eventually(lambda: client.connections == 2, timeout=5)

        second = await client.client()
        service.factory.drain()  # at once: not settled
        service.factory.draining = False
        await second.when_closed()
        with pytest.raises(NoServerReachable):
            await client.client(timeout=2)  # the next attempt is 30 s away
        assert client.connections == 2
    finally:
        await client.stop()


@pytest_twisted.ensureDeferred
async def test_a_webhook_the_stopping_server_cannot_take_is_503_with_retry_after(redis_server, start):
    """Late in a stop the script runner is stopped while HTTP connections may still deliver:
    such a webhook gets 503 with Retry-After (the provider retries, elsewhere), and the log says
    why (the server is shutting down, not that Redis is unreachable)."""
    from twisted.logger import globalLogPublisher

    from circles.server.providers.secrets import WebhookSecrets
    from devtools.webhook_support import STRIPE_SECRET, encode, post, stripe_event, stripe_headers

    service, port = await serve(start, redis_server.url, stripe_secrets=WebhookSecrets.of(STRIPE_SECRET))
    body = encode(stripe_event("evt_drain_ok"))
    assert (await post(port, f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body))).code == 200
    service.factory.draining = True  # as stopService has it by then
    await service.script_runner.stopService()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        body = encode(stripe_event("evt_drain_late"))
        reply = await post(port, f"/webhooks/stripe/{CIRCLE}", body, stripe_headers(body))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (reply.code, reply.header("retry-after")) == (503, "30")
    assert reply.json() == {"error": "backend unavailable, retry later"}
    assert any("the server is shutting down" in str(e.get("error", "")) for e in events), events
