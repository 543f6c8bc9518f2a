"""circles.client on its own: the URLs it takes, backing off from a server that closes before the
WebSocket opens (loopback, in this process), the play timeout on a clock.

Against the real server (TLS, Redis, a worker): tests/integration/test_client.py."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from circles.client import NoServerReachable, ReconnectingClient
from circles.client.signing import generate, public_key

from ..play_client import eventually

CIRCLE_KEY = generate()
CIRCLE = public_key(CIRCLE_KEY)
IDLE = public_key(generate())  # served, but no worker takes its tasks


def url(port: int, circle: str = CIRCLE, host: str = "localhost") -> str:
    return f"wss://{host}:{port}/{circle}"


def test_reconnecting_client_urls_must_name_one_circle():
    with pytest.raises(ValueError, match="must all name the same circle"):
        ReconnectingClient([url(1000), url(1001, IDLE)], reactor=reactor)
    with pytest.raises(ValueError, match="no URL given"):
        ReconnectingClient([], reactor=reactor)
    with pytest.raises(ValueError, match="names no circle"):
        ReconnectingClient([url(1000), url(1001, "")], reactor=reactor)
    assert ReconnectingClient(url(1000), reactor=reactor).urls == [url(1000)]  # one URL, as before


# -- servers that close before the WebSocket opens, or cannot be reached -------------------------
# (over TLS too: tests/integration/test_client.py)

class _Slammer(Protocol):
    """A load balancer with no backend (or a draining server): accepts, then closes at once."""

    def connectionMade(self) -> None:
        self.factory.accepted += 1
        self.transport.loseConnection()


@pytest_twisted.async_yield_fixture
async def slammer():
    """A real listening TCP socket that accepts each connection and closes it; yields the factory
    (``accepted`` counts connections, ``port`` is the port)."""
    factory = Factory.forProtocol(_Slammer)
    factory.accepted = 0
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = listening.getHost().port
    yield factory
    await maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_reconnecting_client_keeps_backing_off_from_a_server_that_closes_at_once(slammer):
    """A connection that never becomes a WebSocket is a failed attempt: the retry policy sees the
    attempts add up, rather than a server closing at once being retried at the first delay forever."""
    attempts = []
    helper = ReconnectingClient(f"ws://127.0.0.1:{slammer.port}/{CIRCLE}", reactor=reactor,
                                retry_policy=lambda attempt: attempts.append(attempt) or 0.01)
    helper.start()
    try:
        await eventually(lambda: len(attempts) >= 4)
    finally:
        await helper.stop()
    assert attempts[:4] == [1, 2, 3, 4]


def test_play_timeout_on_a_clock_and_no_waiter_kept():
    """The same on a Clock: a connection attempt that never finishes (a black-holed SYN; the
    endpoint's own timeout is 30 s) fails the play at its timeout, not a moment before, and
    every call that timed out is forgotten (nothing held per call while no server answers)."""
    clock = MemoryReactorClock()
    helper = ReconnectingClient(f"ws://127.0.0.1:9/{CIRCLE}", reactor=clock)
    helper.start()
    results: list = []
    helper.play("1", timeout=5).addBoth(results.append)
    clock.advance(4.999)
    assert results == [] and len(clock.tcpClients) == 1
    clock.advance(0.001)
    [failure] = results
    assert failure.check(NoServerReachable)
    assert str(failure.value) == (f"no server was reachable within 5 s (ws://127.0.0.1:9/{CIRCLE}: "
                                  "no attempt has finished yet)")
    # a program that keeps calling meanwhile: each call's wait ends with its timeout
    calls = [helper.play("1", timeout=1) for _ in range(1000)]
    for d in calls:
        d.addErrback(lambda f: f.trap(NoServerReachable))
    assert len(helper._waiters) == 1000
    clock.advance(1)
    assert helper._waiters == []
    helper.stop()
    stopped = helper.client()
    assert stopped.called  # stopped: fails at once (CancelledError) rather than wait
    stopped.addErrback(lambda f: f.trap(CancelledError))


class _Ticking(MemoryReactorClock):
    """A clock whose time moves on a little each time it is read, as a real reactor's does."""

    def seconds(self) -> float:
        self.rightNow += 1e-5
        return self.rightNow


def test_play_timeout_names_the_timeout_given():
    """The error names the play's timeout, not what was left of it when the wait began (a real
    reactor's time moves on meanwhile: "within 4.99999 s" for a play given 5)."""
    clock = _Ticking()
    helper = ReconnectingClient(f"ws://127.0.0.1:9/{CIRCLE}", reactor=clock)
    helper.start()
    results: list = []
    helper.play("1", timeout=5).addBoth(results.append)
    clock.advance(5)
    [failure] = results
    assert failure.check(NoServerReachable)
    assert str(failure.value).startswith("no server was reachable within 5 s ("), str(failure.value)
    helper.stop()
