"""The service accepts with EagerServer connections (EagerServer itself on loopback sockets:
tests/unit/test_eager.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import struct

import pytest_twisted
from twisted.internet import reactor, tcp

from circles import CirclesService, Config
from circles.common.eager import CLOSE_GRACE
from circles.server import tls
from circles.server.http.eager import EagerServer

from ..inmemory import NoScriptBackend
from ..play_client import eventually
from ..support import Key, RawTLSClient
from ..unit.test_limits import CIRCLE, in_thread, serve
from .test_limits import masked_frame, raw_upgrade


@pytest_twisted.ensureDeferred
async def test_the_service_accepts_with_eager_connections(start):
    circle = Key()
    service = start(CirclesService(Config(circles=[circle.pubkey], listen=("tcp:0:interface=127.0.0.1",)),
                                   reactor=reactor))
    [port] = await service.when_listening()
    assert issubclass(port.transport, EagerServer)  # counted by the accept gate, eager all the same


@pytest_twisted.ensureDeferred
async def test_the_server_ends_the_tcp_connection_first_once_a_client_closes(start):
    """RFC 6455 7.1.1: the server closes the TCP connection first, so that the TIME_WAIT is its
    own. Its FIN leaves with the close frame that answers the client's, not on a later turn of
    the reactor, by which a busy server let the client's FIN come first (4% of connections)."""
    service, port = await serve(start)
    sock = await in_thread(raw_upgrade, port)
    try:
        sock.settimeout(5)
        [protocol] = await eventually(lambda: list(service.factory.open_connections))
        # The client's close, given to the server as its reactor would; then, the reactor held,
        # the client reads the answer and the end of the stream.
        protocol.dataReceived(masked_frame(struct.pack("!H", 1000), opcode=0x8))
        received = b""
        while chunk := sock.recv(1024):
            received += chunk
        assert received == b"\x88\x02\x03\xe8"  # the close frame (1000), then the FIN
        await eventually(lambda: not service.factory.open_connections)
    finally:
        sock.close()


async def _tls_client(start, tls_files) -> tuple[CirclesService, RawTLSClient]:
    """A TLS service (no script backend) and a RawTLSClient connected to it."""
    service = start(CirclesService(Config(circles=[CIRCLE], listen=(), port=0, interface="127.0.0.1",
                                          tls=tls.load(tls_files["cert"], tls_files["key"])),
                                   reactor=reactor, scripts=NoScriptBackend()))
    [port] = await service.when_listening()
    client = await in_thread(RawTLSClient, port.getHost().port, ssl.create_default_context(cafile=tls_files["ca"]))
    return service, client


async def _tls_websocket(start, tls_files) -> tuple[CirclesService, RawTLSClient]:
    """A TLS service (no script backend) and a WebSocket opened to it by a RawTLSClient."""
    service, client = await _tls_client(start, tls_files)
    key = base64.b64encode(os.urandom(16)).decode()
    await in_thread(client.send, (f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                  f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert (await in_thread(client.read_until, b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    return service, client


@pytest_twisted.ensureDeferred
async def test_over_tls_the_server_ends_the_tcp_connection_first_too(start, tls_files):
    """Over TLS the close frame, the server's close_notify and its FIN leave together: before,
    the server waited for the client's close_notify, and the client always closed first."""
    service, client = await _tls_websocket(start, tls_files)
    try:
        [protocol] = await eventually(lambda: list(service.factory.open_connections))
        protocol.dataReceived(masked_frame(struct.pack("!H", 1000), opcode=0x8))  # then, the reactor held:
        client.raw_until_fin()
        assert client.tls.read() == b"\x88\x02\x03\xe8"  # the close frame (1000)
        assert client.tls.read() == b""  # the server's close_notify; the FIN came after it
        client.close_notify()
        await eventually(lambda: protocol.transport.transport.disconnected)
    finally:
        client.sock.close()


@pytest_twisted.ensureDeferred
async def test_over_tls_a_client_that_never_answers_close_notify_is_not_held(start, tls_files):
    """After its close frame, close_notify and FIN, the server waits for the client's close_notify
    (Twisted's TLS transport), but not for ever: a client that stays silent held the
    descriptor and its TLS state until it left."""
    service, client = await _tls_websocket(start, tls_files)
    try:
        [protocol] = await eventually(lambda: list(service.factory.open_connections))
        await in_thread(client.send, masked_frame(struct.pack("!H", 1000), opcode=0x8))
        await in_thread(client.raw_until_fin)
        assert client.tls.read() == b"\x88\x02\x03\xe8" and client.tls.read() == b""
        # The client never sends its close_notify, nor closes: the server's TCP connection ends.
        await eventually(lambda: protocol.transport.transport.disconnected, timeout=3 * CLOSE_GRACE)
    finally:
        client.sock.close()


@pytest_twisted.ensureDeferred
async def test_a_client_that_closes_with_replies_unread_and_never_reads_is_not_held(start):
    """Replies queued when the client's close frame comes go first, then the close: a client
    that never reads them held the descriptor and the buffer for ever (its close frame had
    ended the slow-reader bound). It gets --slow-reader-timeout to read them, as when open."""
    service, port = await serve(start, rate_limit=0, slow_reader_timeout=1)
    sock = await in_thread(raw_upgrade, port, rcvbuf=4096)
    try:
        [protocol] = await eventually(lambda: list(service.factory.open_connections))
        protocol.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        calls = b"".join(masked_frame(json.dumps({"jsonrpc": "2.0", "id": i, "method": "whoami"}).encode())
                         for i in range(200))  # more replies than the kernel's buffers take, fewer than pause it
        await in_thread(sock.sendall, calls + masked_frame(struct.pack("!H", 1000), opcode=0x8))
        await eventually(lambda: protocol.state == protocol.STATE_CLOSED)
        assert protocol.transport.dataBuffer or protocol.transport._tempDataBuffer  # still queued
        await eventually(lambda: protocol.transport.disconnected, timeout=10)
    finally:
        sock.close()


def _server_side(client: socket.socket):
    """The server's connection (a twisted tcp.Server) to ``client``, a loopback socket."""
    [connection] = [reader for reader in reactor.getReaders()
                    if isinstance(reader, tcp.Server) and reader.getPeer().port == client.getsockname()[1]]
    return connection


def _http_exchange(sock, request: bytes) -> bytes:
    """Send a request, read its answer's head and its body (by Content-Length). Blocking."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(4096)
    return head


@pytest_twisted.ensureDeferred
async def test_an_http_answer_with_connection_close_ends_the_tcp_connection_at_once(start):
    """A client that asks for "Connection: close" (HTTP/1.0 clients, probes) gets the answer and
    the server's FIN together: the server, not the client, keeps the TIME_WAIT."""
    service, port = await serve(start)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        head = await in_thread(_http_exchange, sock, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")  # kept alive: now the channel is there
        channel = await eventually(lambda: _server_side(sock).protocol._inner)
        channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):  # the reactor held: the FIN is there already
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"connection: close" in received.lower()
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_over_tls_an_http_client_that_never_answers_close_notify_is_not_held(start, tls_files):
    """After an answer with "Connection: close" the HTTP channel has no deadline running, and
    over TLS the close waited for the client's close_notify: a client that never sent it held
    its connection (and the TLS state) for ever. Now it gets CLOSE_GRACE."""
    _, client = await _tls_client(start, tls_files)
    try:
        connection = await eventually(lambda: _server_side(client.sock))
        await in_thread(client.send, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        await in_thread(client.raw_until_fin)  # the answer, close_notify and the FIN
        assert client.tls.read(4096).startswith(b"HTTP/1.1 200") and client.tls.read() == b""
        # The client never sends its close_notify, nor closes.
        await eventually(lambda: connection.disconnected, timeout=3 * CLOSE_GRACE)
    finally:
        client.sock.close()
