"""The private redis-server started when no --redis-url is given, and the plugins' start-up.

(What is refused before any redis-server starts: tests/unit/test_embedded_redis.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from circles.backend.embedded import EmbeddedRedis, EmbeddedRedisError
from circles.backend.redis import connect
from circles.backend.redis_url import RedisAddress
from devtools.redis_server import REDIS_SERVER

from ..play_client import eventually, new_key, pk
from ..support import twistd

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().split(") ")[1].startswith("Z")
    except OSError:
        return False


async def answering(redis: EmbeddedRedis) -> RedisAddress:
    """Wait as the server's dispatcher and the workers do: a connection that retries until Redis
    takes it; then it must answer."""
    factory = connect(redis.address, reactor)
    try:
        connection = await factory.getConnection(peek=True)
        assert await connection.ping() == "PONG"
    finally:
        await factory.disconnect()
    return redis.address


@pytest_twisted.ensureDeferred
async def test_starts_answers_and_stops_without_leftovers(tmp_path):
    redis = EmbeddedRedis(str(tmp_path / "state"), reactor=reactor)
    redis.startService()
    address = await answering(redis)
    assert address.path == str(tmp_path / "state" / "redis.sock")
    assert oct(os.stat(address.path).st_mode & 0o777) == "0o700"
    pid = redis._transport.pid
    assert alive(pid)
    await redis.stopService()
    assert not alive(pid)
    assert not os.path.exists(address.path)
    assert os.path.isdir(tmp_path / "state")  # a given state directory is kept


@pytest_twisted.ensureDeferred
async def test_killed_redis_is_started_again_on_the_same_socket(tmp_path):
    """A production day: the private redis-server is killed (OOM killer, an operator). The server
    runs on, so its Redis comes back where the script runner and the workers reconnect."""
    redis = EmbeddedRedis(str(tmp_path), reactor=reactor)
    redis.startService()
    address = await answering(redis)
    # Killed once the service itself saw it answer (its own PING, every 50 ms): one killed before
    # that failed at start, and is not started again.
    await eventually(lambda: redis._answered)
    try:
        for _ in range(2):  # and again: each kill is answered by one new redis-server
            first = redis._transport.pid
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: redis._transport.pid != first and answers(address.path))  # noqa: B023
            assert not alive(first)
        pid = redis._transport.pid
    finally:
        await redis.stopService()
    assert not alive(pid)
    assert not os.path.exists(address.path)


def answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_temporary_state_dir_is_removed():
    redis = EmbeddedRedis(None, reactor=reactor)
    directory = redis.state_dir
    assert redis.address.path == os.path.join(directory, "redis.sock")
    assert not os.path.exists(directory)  # named, not made: only a start makes it
    redis.startService()
    await answering(redis)
    assert os.path.exists(directory)
    assert oct(os.stat(directory).st_mode & 0o777) == "0o700"
    await redis.stopService()
    assert not os.path.exists(directory)
    redis.startService()  # started again: the same directory, made again, so the same address
    try:
        await answering(redis)
    finally:
        await redis.stopService()
    assert not os.path.exists(directory)


@pytest_twisted.ensureDeferred
async def test_refuses_a_state_dir_in_use(tmp_path):
    first = EmbeddedRedis(str(tmp_path), reactor=reactor)
    first.startService()
    await answering(first)
    try:
        with pytest.raises(EmbeddedRedisError, match="already running"):
            EmbeddedRedis(str(tmp_path), reactor=reactor).startService()
    finally:
        await first.stopService()


def test_second_server_on_a_state_dir_in_use_exits_with_one_line(tmp_path):
    """Started twice on one --state-dir (a second try-out, a second terminal): the second says
    why in one line and exits; the first serves on."""
    env = dict(os.environ)
    env.pop("CIRCLES_REDIS_URL", None)
    with twistd(["--port", "0", "--interface", "127.0.0.1"], tmp_path) as first:
        first.wait_for("connected to Redis")
        second = _twistd("circles", "--port", "0", "--interface", "127.0.0.1", cwd=str(tmp_path), env=env)
        output = second.communicate(timeout=120)[0].decode()
        assert second.returncode != 0
        assert "a Redis is already running on" in output and "another server uses this --state-dir" in output
        assert "Traceback" not in output
        assert first.proc.poll() is None


def _twistd(*argv, cwd, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "twisted", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_twistd_missing_binary_exits_with_one_line(tmp_path):
    env = dict(os.environ, PATH="/nonexistent")
    env.pop("CIRCLES_REDIS_URL", None)
    process = _twistd("circles", cwd=str(tmp_path), env=env)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode != 0
    assert "redis-server not found on PATH" in output
    assert "Traceback" not in output


def test_killed_server_leaves_no_redis(tmp_path):
    """SIGKILL the server: the private Redis goes with it (parent-death signal)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    env = dict(os.environ)
    env.pop("CIRCLES_REDIS_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "twisted", "circles", "--listen", "tcp:0:interface=127.0.0.1",
                               "-k", pk(new_key())], cwd=str(tmp_path), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        socket_path = tmp_path / "circles-state" / "redis.sock"
        while not socket_path.exists():
            assert time.monotonic() < deadline, "the private Redis did not start"
            time.sleep(0.05)
        pids = subprocess.run(["pgrep", "-f", f"unixsocket:{socket_path}"], capture_output=True, text=True).stdout.split()
        assert pids
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 30
    while any(alive(int(pid)) for pid in pids):
        assert time.monotonic() < deadline, "redis-server outlived the killed server"
        time.sleep(0.05)
