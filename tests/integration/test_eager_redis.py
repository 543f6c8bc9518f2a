"""Commands to Redis go out at once when nothing is queued (circles.common.eager), over TCP and
over a Unix socket, and what Twisted promises of a transport still holds: order, and a command
larger than the socket takes at once (the rest queued, and everything after it behind it)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from circles.backend.redis import connect
from circles.backend.redis_url import parse_redis_url
from circles.common.eager import EagerWrites
from devtools.redis_server import REDIS_SERVER, RedisProcess


@pytest.fixture
def redis_both():
    """A redis-server listening on TCP and on a Unix socket: (tcp url, unix url, its process)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    directory = tempfile.mkdtemp(prefix="eager-")  # short: a Unix socket's path has a small limit
    sock = os.path.join(directory, "redis.sock")
    server = RedisProcess(directory, args=["--unixsocket", sock, "--unixsocketperm", "700"])
    server.start()
    try:
        yield server.url, f"unix://{sock}", server.process
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("over", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_commands_to_redis_leave_at_once_and_in_order(redis_both, over):
    url = redis_both[0] if over == "tcp" else redis_both[1]
    factory = connect(parse_redis_url(url), reactor, reply_timeout=30.0)
    try:
        connection = await factory.getConnection(peek=True)
        transport = connection.transport
        assert isinstance(transport, EagerWrites)
        ping = connection.execute_command("PING")
        assert (transport.dataBuffer, transport._tempDataBuffer) == (b"", [])  # sent, not queued
        assert await ping == "PONG"
        size = 32 << 20  # more than a socket's buffer: part of it sent, the rest queued
        replies = [connection.execute_command("SET", "big", "x" * size)]
        assert transport.dataBuffer or transport._tempDataBuffer
        replies += [connection.execute_command("STRLEN", "big")]
        replies += [connection.execute_command("INCR", "n") for _ in range(300)]
        assert await gatherResults(replies) == ["OK", size] + list(range(1, 301))
        assert (transport.dataBuffer, transport._tempDataBuffer) == (b"", [])
    finally:
        await factory.disconnect()


@pytest_twisted.ensureDeferred
async def test_reply_timeouts_are_one_lane_and_still_fail_the_commands_and_the_connection(redis_both):
    """Each command's reply timeout is an entry of one lane of timers (one call of the clock for
    the connection, none made per command), and a Redis that stops answering still fails the
    command after the timeout with txredisapi's TimeoutError, fails the others waiting, and drops
    the connection, which comes back once Redis answers again."""
    from ..play_client import eventually

    factory = connect(parse_redis_url(redis_both[0]), reactor, reply_timeout=0.5)
    server = redis_both[2]
    try:
        connection = await factory.getConnection(peek=True)
        before = len(reactor.getDelayedCalls())
        replies = [connection.execute_command("INCR", "n") for _ in range(200)]
        assert len(reactor.getDelayedCalls()) <= before + 1  # the lane's call, not 200
        assert await gatherResults(replies) == list(range(1, 201))
        server.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            first, second = connection.execute_command("PING"), connection.execute_command("INCR", "n")
            with pytest.raises(txredisapi.TimeoutError, match="Not received Redis response in 0.5 seconds"):
                await first
            assert 0.4 < time.monotonic() - started < 5
            with pytest.raises(txredisapi.TimeoutError):
                await second
            await eventually(lambda: not connection.connected)
        finally:
            server.send_signal(signal.SIGCONT)
        again = await factory.getConnection(peek=True)
        assert again is not connection and await again.execute_command("PING") == "PONG"
    finally:
        await factory.disconnect()
