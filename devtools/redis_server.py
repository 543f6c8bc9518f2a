"""Real ``redis-server`` processes (a server, Sentinels, a primary with its replica) plus a tiny
synchronous client to inspect them.

The tests' fixtures around them are in tests/conftest.py: ``redis_server`` is function-scoped, so
each test gets its own server on a free TCP port, in its own temporary directory, and may kill
and restart it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence

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

    def __enter__(self) -> SyncRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

    def pretend_worker(self, circle: str, prefix: str = "circles:", worker_id: str = "pretend") -> None:
        """Count a live worker for ``circle`` that takes no task (heartbeat far in the future): a
        play is queued and waits, as for a worker that is busy."""
        self("ZADD", f"{prefix}workers:{circle}", 10 ** 11, worker_id)

    def clients(self) -> list[dict]:
        """CLIENT LIST, one dict per connection (this one included)."""
        rows = []
        for line in self("CLIENT", "LIST").splitlines():
            rows.append(dict(item.split("=", 1) for item in line.split() if "=" in item))
        return rows


class RedisProcess:
    """A redis-server on ``port``; :meth:`kill` and :meth:`start` it at will. ``args`` are
    more of its options (``["--replicaof", "127.0.0.1", "6379"]``)."""

    def __init__(self, directory: str, port: int | None = None, args: Sequence[str] = ()) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = list(args)
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.directory, *self.args]

    def start(self, timeout: float = 30.0) -> None:
        self.start_with_password(None, timeout)

    def start_with_password(self, password: str | None, timeout: float = 30.0) -> None:
        """Start it, and wait until it answers a PING (after AUTH with ``password``, if given)."""
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = SyncRedis(self.port)
                try:
                    if password is not None:
                        client("AUTH", password)
                    if client("PING") == "PONG":
                        return
                except RuntimeError as e:  # a replica loading its data answers -LOADING: not ready yet
                    if not str(e).startswith("LOADING"):
                        raise
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


class SentinelProcess(RedisProcess):
    """A Redis Sentinel (``redis-server --sentinel``) watching ``master`` at ``primary_port``
    with ``quorum``; its config file is its own to rewrite, as Sentinel does."""

    def __init__(self, directory: str, master: str, primary_port: int, *, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> None:
        super().__init__(directory)
        self.config = os.path.join(directory, f"sentinel-{self.port}.conf")
        with open(self.config, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
                    f"sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n"
                    f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
                    f"sentinel failover-timeout {master} {failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {master} 1\n")

    def command(self) -> list[str]:
        return [REDIS_SERVER, self.config, "--sentinel"]


class ReplicatedRedis:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels on loopback, as real
    processes, the set-up of docs/deployment.md on one machine. :attr:`url` is the
    ``redis+sentinel://`` URL naming it; :meth:`primary` asks the Sentinels which node is the
    primary now; :meth:`start` returns once every Sentinel knows the replicas and the others."""

    def __init__(self, directory: str, *, master: str = "circles", replicas: int = 1, sentinels: int = 3,
                 down_after_ms: int = 1000) -> None:
        self.master = master
        self.nodes = [RedisProcess(self._dir(directory, "node0"))]
        primary = self.nodes[0].port
        self.nodes += [RedisProcess(self._dir(directory, f"node{i + 1}"), args=["--replicaof", "127.0.0.1", str(primary)])
                       for i in range(replicas)]
        self.sentinels = [SentinelProcess(self._dir(directory, f"sentinel{i}"), master, primary,
                                          quorum=sentinels // 2 + 1, down_after_ms=down_after_ms)
                          for i in range(sentinels)]
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        self.url = f"redis+sentinel://{hosts}/{master}/0"

    @staticmethod
    def _dir(parent: str, name: str) -> str:
        path = os.path.join(parent, name)
        os.makedirs(path, exist_ok=True)
        return path

    def start(self, timeout: float = 30.0) -> None:
        self.start_with_password(None, timeout)

    def start_with_password(self, password: str | None, timeout: float = 30.0) -> None:
        """Start it all; ``password`` is the nodes' (``--requirepass``, in their ``args``)."""
        for node in self.nodes:
            node.start_with_password(password, timeout)
        for sentinel in self.sentinels:
            sentinel.start(timeout)
        deadline = time.monotonic() + timeout
        while not self.settled():
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinels did not find the replicas and each other in time")
            time.sleep(0.1)

    def settled(self) -> bool:
        """Every Sentinel sees the primary up, every replica linked, and every other Sentinel:
        a failover can happen now."""
        for sentinel in self.sentinels:
            try:
                with_client = sentinel.client()
                try:
                    master = _pairs(with_client("SENTINEL", "MASTER", self.master))
                    replicas = [_pairs(r) for r in with_client("SENTINEL", "REPLICAS", self.master)]
                finally:
                    with_client.close()
            except (OSError, RuntimeError, ConnectionError):
                return False
            if "s_down" in master["flags"] or int(master["num-other-sentinels"]) != len(self.sentinels) - 1:
                return False
            linked = [r for r in replicas if r.get("master-link-status") == "ok" and "s_down" not in r["flags"]]
            if len(linked) < len(self.nodes) - 1:
                return False
        return True

    def primary(self) -> RedisProcess | None:
        """The node the Sentinels name as primary now (the first that answers), if it is ours."""
        for sentinel in self.sentinels:
            try:
                client = sentinel.client()
                try:
                    host, port = client("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
                finally:
                    client.close()
            except (OSError, RuntimeError, ConnectionError, TypeError, ValueError):
                continue
            return next((node for node in self.nodes if node.port == int(port)), None)
        return None

    def wait_for_new_primary(self, old: RedisProcess, timeout: float = 30.0) -> RedisProcess:
        """Wait until a node other than ``old`` is the primary and says so itself."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.primary()
            if node is not None and node is not old:
                try:
                    client = node.client()
                    try:
                        if client("ROLE")[0] == "master":
                            return node
                    finally:
                        client.close()
                except (OSError, RuntimeError, ConnectionError):
                    pass
            time.sleep(0.05)
        raise RuntimeError("no failover within the time allowed")

    def stop(self) -> None:
        for process in self.sentinels + self.nodes:
            process.kill()


def _pairs(flat: list) -> dict:
    return dict(zip(flat[0::2], flat[1::2]))
