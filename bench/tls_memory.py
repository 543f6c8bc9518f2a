"""Memory per idle WebSocket connection, plain and over TLS, on a real ``twistd -n circles``.

    .venv/bin/python bench/tls_memory.py [--connections 3000] [--rounds 1]

Starts the server (plain, then TLS 1.3, then TLS 1.2 with a development certificate), opens
N WebSocket connections from this process (raw sockets, Python's ssl), waits for the server
to settle, and reads the server's resident memory from /proc before and with all of them open.
Prints one Markdown row per variant; docs/benchmarks.md keeps the results.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circles.tryout import devcert  # noqa: E402

TWISTD = str(Path(sys.executable).with_name("twistd"))
CIRCLE = "02" + "%064x" % 1


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_connection(port: int, context) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head[:200])
    return sock


def measure(name: str, args: list, context, n: int, workdir: Path) -> dict:
    port = free_port()
    log = open(workdir / f"{name}.log", "w")
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "--logfile=-", "circles", "--port", str(port),
                             "--interface", "127.0.0.1", "-k", CIRCLE, "--max-connections", "0",
                             "--ping-interval", "0", "--state-dir", str(workdir / f"state-{name}"), *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                open_connection(port, context).close()
                break
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for _ in range(50):  # warm up allocator pools and caches
            open_connection(port, context).close()
        time.sleep(1)
        before = rss(proc.pid)
        socks = [open_connection(port, context) for _ in range(n)]
        time.sleep(2)
        during = rss(proc.pid)
        for s in socks:
            s.close()
        return {"variant": name, "connections": n, "rss_before": before, "rss_open": during,
                "per_connection": (during - before) / n}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=3000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.connections + 1000)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        certs = devcert.make(str(workdir / "certs"))
        tls_args = ["--tls-cert", certs["cert"], "--tls-key", certs["key"]]
        tls13 = ssl.create_default_context(cafile=certs["ca"])
        tls12 = ssl.create_default_context(cafile=certs["ca"])
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        rows = [measure("plain", [], None, args.connections, workdir),
                measure("tls1.3", tls_args, tls13, args.connections, workdir),
                measure("tls1.2", tls_args, tls12, args.connections, workdir)]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| variant | connections | server RSS before / open (MB) | per idle connection |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['connections']} | {row['rss_before'] / 2**20:.1f} / "
              f"{row['rss_open'] / 2**20:.1f} | {row['per_connection'] / 1024:.1f} KiB |")


if __name__ == "__main__":
    main()
