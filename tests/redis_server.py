"""A real ``redis-server`` for tests: fixtures plus a tiny synchronous client to inspect it.

Registered from ``conftest.py``. ``redis_server`` is function-scoped: each test gets its own
server on a free TCP port, in its own temporary directory, and may kill and restart it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from typing import Optional

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SyncRedis:
    """Just enough RESP to look at a test server's keys; blocking, for quick local commands."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buffer) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n + 2:]
        return data

    def _read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode("utf-8", "replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"unexpected reply {line!r}")

    def __call__(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(out))
        return self._read()

    def hgetall(self, key: str) -> dict:
        flat = self("HGETALL", key)
        return dict(zip(flat[0::2], flat[1::2]))

    def clients(self) -> "list[dict]":
        """CLIENT LIST, one dict per connection (this one included)."""
        rows = []
        for line in self("CLIENT", "LIST").splitlines():
            rows.append(dict(item.split("=", 1) for item in line.split() if "=" in item))
        return rows


class RedisProcess:
    """A redis-server on ``port``; :meth:`kill` and :meth:`start` it at will."""

    def __init__(self, directory: str, port: Optional[int] = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = SyncRedis(self.port)
                try:
                    if client("PING") == "PONG":
                        return
                finally:
                    client.close()
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self) -> SyncRedis:
        return SyncRedis(self.port)


@pytest.fixture
def redis_server(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(str(tmp_path))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client()
    yield client
    client.close()
