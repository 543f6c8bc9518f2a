"""The TLS and HTTP edge as attackers meet it: connections that never finish a handshake,
refusals over TLS, the ``--metrics-listen`` port, pipelining without reading, per-address limits
on a dual-stack port, against a real ``twistd -n circles`` over real sockets.

Counts, not durations: each test opens connections and counts how many the server still holds.
"""

from __future__ import annotations

import re
import socket
import ssl
import time

import pytest
import trustme

from ..support import Key, client_tls, eventually_true, still_open, twistd

CIRCLE = Key()
#: The first bytes of a ClientHello: a client that starts a handshake and never finishes it.
PARTIAL_CLIENT_HELLO = bytes.fromhex("16030100c8010000c40303")
CAP = 5  # --max-pending-per-ip


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    directory = tmp_path_factory.mktemp("tls")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(directory / "cert.pem"), append=i > 0)
    return {name: str(directory / f"{name}.pem") for name in ("ca", "key", "cert")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls_files):
    """TLS on the main port and on ``--metrics-listen``; a request deadline long enough that a
    connection still held is one the server chose to keep, not one it has yet to time out."""
    metrics_port = _free_port()
    args = ["--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"], "--port", "0",
            "--interface", "127.0.0.1", "--handshake-timeout", "120", "--max-pending-per-ip", str(CAP),
            "--max-request-body", "1000", "-k", CIRCLE.pubkey,
            "--metrics-listen", f"ssl:{metrics_port}:interface=127.0.0.1:privateKey={tls_files['key']}:"
                                f"certKey={tls_files['cert']}"]
    with twistd(args, tmp_path_factory.mktemp("server")) as process:
        process.wait_for("connected to Redis")  # both ports listen by then
        process.port = next(port for port in map(int, re.findall(r"starting on (\d+)", process.output))
                            if port != metrics_port)
        process.metrics_port = metrics_port
        yield process


def _half_hellos(port: int, n: int) -> list:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(PARTIAL_CLIENT_HELLO)
        socks.append(sock)
    return socks


def _close(socks: list) -> None:
    for sock in socks:
        sock.close()


@pytest.mark.parametrize("which", ["main", "metrics"])
def test_unfinished_tls_handshakes_past_the_pending_cap_are_not_held(server, which):
    """Past --max-pending-per-ip the server refuses, but over TLS the refusal waited for a
    handshake the client never finishes: every refused connection held a descriptor until the
    client left. (The --metrics-listen port had no cap at all, and only Twisted's minute of silence as a timeout.)"""
    port = server.port if which == "main" else server.metrics_port
    crowd = _half_hellos(port, 3 * CAP)
    try:
        assert eventually_true(lambda: still_open(crowd) == CAP), still_open(crowd)
    finally:
        _close(crowd)


def _tls_exchange(server, tls_files, request: bytes, port: int = 0) -> tuple:
    """Send ``request`` over TLS and read to the end: (what came back, how the stream ended)."""
    context = client_tls(tls_files["ca"])
    with socket.create_connection(("127.0.0.1", port or server.port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as sock:
            try:
                sock.sendall(request)
            except OSError:
                pass
            received = b""
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return received, "close_notify"
                    received += data
            except ssl.SSLEOFError:
                return received, "truncated"
            except ConnectionResetError:
                return received, "reset"


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
    (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
    (b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000, b"413"),
], ids=["431", "414", "413"])
def test_refusals_over_tls_end_with_close_notify(server, tls_files, request_bytes, status):
    """The answers to a head or body too large used to end with a TCP half-close under TLS (Twisted's
    TLS transport lends out the TCP one's ``loseWriteConnection``): no close_notify, which strict
    clients report as a truncation."""
    received, ending = _tls_exchange(server, tls_files, request_bytes)
    assert received.startswith(b"HTTP/1.1 " + status), received[:100]
    assert ending == "close_notify"


def test_the_metrics_port_bounds_request_bodies(server, tls_files):
    request = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
    received, _ = _tls_exchange(server, tls_files, request, server.metrics_port)
    assert received.startswith(b"HTTP/1.1 413"), received[:100]


def test_the_metrics_port_still_serves_metrics(server, tls_files):
    received, _ = _tls_exchange(server, tls_files, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                server.metrics_port)
    assert received.startswith(b"HTTP/1.1 200") and b"circles_tcp_connections_open" in received


def test_the_metrics_port_has_the_request_deadline(tmp_path, tls_files):
    """Silent connections to the metrics port (plain TCP here) are dropped at --handshake-timeout,
    as on the main port; they used to stay for Twisted's default, a minute of silence (forever,
    for a client sending a byte now and then)."""
    metrics_port = _free_port()
    args = ["--port", "0", "--interface", "127.0.0.1", "--handshake-timeout", "1", "-k", CIRCLE.pubkey,
            "--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1"]
    with twistd(args, tmp_path) as process:
        process.wait_for("connected to Redis")
        silent = [socket.create_connection(("127.0.0.1", metrics_port), timeout=30) for _ in range(3)]
        try:
            assert eventually_true(lambda: still_open(silent) == 0, timeout=30), still_open(silent)
        finally:
            _close(silent)


def test_pipelined_requests_wait_while_the_client_reads_nothing(server, tls_files):
    """A client pipelines requests for a large answer (/openrpc.json, 12 KB) and reads nothing.
    The server used to answer every one, each answer encrypted and buffered (6 GB of RSS from 20 MB
    of requests): Twisted's HTTP channel went on parsing what it had read while the transport was
    full. Now it stops at what the socket buffers hold. (Over plain TCP the answers to a fixed
    document share one bytes object, so the same flaw cost little memory there.)"""
    pipelined = 3000

    def served() -> int:
        return sum("GET /openrpc.json" in line for line in server.lines)

    before = served()
    context = client_tls(tls_files["ca"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"GET /openrpc.json HTTP/1.1\r\nHost: x\r\n\r\n" * pipelined)
            counts = [served() - before]
            while len(counts) < 20 or counts[-1] != counts[-20]:  # until it stops for 20 polls
                if counts[-1] == pipelined:
                    break
                time.sleep(0.1)
                counts.append(served() - before)
    assert counts[-1] < pipelined // 2, counts[-1]


def _nonce_statuses(port: int, source: str, n: int) -> list:
    """The statuses of ``n`` pipelined ``GET /auth/nonce`` from ``source``."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as sock:
        sock.sendall(f"GET /auth/nonce?public_key={CIRCLE.pubkey} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * n)
        received = b""
        while received.count(b"HTTP/1.1 ") < n:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    # each answer's status line (an answer with its length ends with its body, no line end)
    return [status.decode() for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


@pytest.mark.skipif(not socket.has_ipv6, reason="needs IPv6 sockets")
def test_ipv4_clients_of_a_dual_stack_port_are_counted_apart(tmp_path):
    """On ``--interface ::`` IPv4 clients arrive as ``::ffff:a.b.c.d``; their HTTP nonces were
    counted against one "/64", so one client taking its 100 locked every IPv4 client out."""
    args = ["--port", "0", "--interface", "::", "-k", CIRCLE.pubkey, "--max-http-nonces-per-ip", "10"]
    with twistd(args, tmp_path) as process:
        port = process.wait_listening()
        assert _nonce_statuses(port, "127.0.0.1", 12).count("429") == 2
        assert _nonce_statuses(port, "127.0.0.2", 3) == ["200"] * 3
