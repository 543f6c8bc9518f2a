"""What one idle WebSocket costs the server's Python heap, line by line, and its resident memory.

    .venv/bin/python -m bench.idle_heap [--connections 2000] [--tls] [--top 25]

Runs the whole server in this process (``CirclesService``, as ``twistd circles`` builds it, with
a script backend that refuses every play: no Redis, which idle connections never use), on a real
reactor and a real loopback port (TLS with a development certificate if ``--tls``), and opens N
WebSockets to it from a child process (raw sockets: its memory is not the server's), twice: the
first time it reads the process's resident memory before and with all of them open; the second,
it compares ``tracemalloc`` snapshots taken before and after, and prints the heap bytes per
connection with the lines that allocated them, largest first (``--frames`` for more of each
stack, ``--types`` for the objects by type). The defaults (idle timeout, pings, rate limit...)
are the server's. What C code allocates (OpenSSL's share of a TLS connection) is in the resident
memory only: ``heaptrack`` shows it by function.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.defer import fail  # noqa: E402
from zope.interface import implementer  # noqa: E402

from circles.backend.scripts import BackendUnavailable, IScriptRunner  # noqa: E402
from circles.server.config import Config  # noqa: E402
from circles.service import CirclesService  # noqa: E402

CIRCLE = "02" + "%064x" % 1

CLIENT = textwrap.dedent("""
    import base64, os, socket, ssl, sys
    port, n, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    context = ssl.create_default_context(cafile=ca) if ca else None
    socks = []
    for _ in range(n):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(("GET /%s HTTP/1.1\\r\\nHost: localhost\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
                      "Sec-WebSocket-Key: %s\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n" % (sys.argv[4], key)).encode())
        head = b""
        while b"\\r\\n\\r\\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise SystemExit("closed during the handshake")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head[:100]
        socks.append(sock)
    print("open", flush=True)
    sys.stdin.readline()
""")


@implementer(IScriptRunner)
class NoScripts:
    def is_connected(self) -> bool:
        return False

    def run(self, request):
        return fail(BackendUnavailable("no script backend in this measurement"))

    def enqueue_once(self, request, data_json, key, ttl):
        return fail(BackendUnavailable("no script backend in this measurement"))


def _where(frame) -> str:
    where = frame.filename
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{where}:{frame.lineno}"


def _types() -> dict:
    found: dict = {}
    for obj in gc.get_objects():
        t = type(obj)
        name = f"{t.__module__}.{t.__qualname__}"
        count, size = found.get(name, (0, 0))
        found[name] = (count + 1, size + sys.getsizeof(obj))
    return found


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def open_clients(reactor, port: int, n: int, ca: str | None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(n), ca or "", CIRCLE],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    os.set_blocking(proc.stdout.fileno(), False)
    line = b""
    while not line.endswith(b"\n"):
        await task.deferLater(reactor, 0.05)
        if proc.poll() is not None:
            raise SystemExit(f"client failed: {proc.returncode}")
        line += proc.stdout.read() or b""
    return proc


async def open_idle(reactor, factory, port: int, n: int, ca: str | None) -> subprocess.Popen:
    """``n`` WebSockets opened from a child process, all open on the server, settled."""
    clients = await open_clients(reactor, port, n, ca)
    while len(factory.open_connections) < n:
        await task.deferLater(reactor, 0.05)
    await task.deferLater(reactor, 2.0)  # past what a connection lets go of a second after it opens
    gc.collect()
    return clients


async def close_all(reactor, factory, clients: subprocess.Popen) -> None:
    clients.stdin.close()
    clients.wait()
    while factory.open_connections:
        await task.deferLater(reactor, 0.05)
    await task.deferLater(reactor, 0.5)
    gc.collect()


async def measure(reactor, n: int, tls: bool, top: int, frames: int, show_types: bool, tmp: str) -> None:
    kwargs = {}
    ca = None
    if tls:
        from circles.server import tls as server_tls
        from circles.tryout import devcert
        certs = devcert.make(os.path.join(tmp, "certs"))
        kwargs["tls"] = server_tls.load(certs["cert"], certs["key"])
        ca = certs["ca"]
    config = Config(circles=[CIRCLE], port=0, interface="127.0.0.1", max_connections=0, state_dir=tmp, **kwargs)
    service = CirclesService(config, reactor=reactor, scripts=NoScripts())
    service.startService()
    [port] = await service.when_listening()
    number = port.getHost().port
    factory = service.factory
    await close_all(reactor, factory, await open_idle(reactor, factory, number, 50, ca))  # pools, caches, imports
    # Resident memory, untraced (tracemalloc's own bookkeeping would count).
    rss_before = rss()
    clients = await open_idle(reactor, factory, number, n, ca)
    rss_open = rss()
    await close_all(reactor, factory, clients)
    # The heap, traced, line by line.
    types_before = _types()
    tracemalloc.start(frames)
    before = tracemalloc.take_snapshot()
    clients = await open_idle(reactor, factory, number, n, ca)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    types_after = _types()
    stats = after.compare_to(before, "lineno" if frames == 1 else "traceback")
    total = sum(s.size_diff for s in stats)
    print(f"{'TLS' if tls else 'plain'}: {n} idle WebSockets; Python heap {total / n:.0f} B per connection "
          f"(tracemalloc), resident memory {(rss_open - rss_before) / n:.0f} B per connection (VmRSS)")
    print(f"{'B/conn':>8} {'blocks/conn':>11}  line")
    for stat in stats[:top]:
        print(f"{stat.size_diff / n:8.1f} {stat.count_diff / n:11.2f}  {_where(stat.traceback[0])}")
        for frame in list(stat.traceback)[1:]:
            print(f"{'':22}{_where(frame)}")
    if show_types:
        one = next(iter(factory.open_connections))
        print(f"one connection's protocol: {len(vars(one))} attributes, its __dict__ {sys.getsizeof(vars(one))} B")
        for name, value in vars(one).items():
            print(f"    {name} = {type(value).__name__} {sys.getsizeof(value)} B: {repr(value)[:80]}")
        print(f"{'objects/conn':>12} {'B/conn':>8}  type (gc-tracked objects only, sys.getsizeof)")
        grown = [(t, types_after[t][0] - types_before.get(t, (0, 0))[0],
                  types_after[t][1] - types_before.get(t, (0, 0))[1]) for t in types_after]
        for t, count, size in sorted(grown, key=lambda g: -g[2])[:top]:
            print(f"{count / n:12.2f} {size / n:8.1f}  {t}")
    await close_all(reactor, factory, clients)
    await service.stopService()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--types", action="store_true", help="also count the objects each connection adds, by type")
    parser.add_argument("--frames", type=int, default=1, help="group by this many frames of each allocation's stack")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        task.react(lambda reactor: defer.ensureDeferred(measure(reactor, args.connections, args.tls, args.top, args.frames, args.types, tmp)))


if __name__ == "__main__":
    main()
