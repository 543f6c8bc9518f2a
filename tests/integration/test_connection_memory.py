"""What one client can make the server hold for its connection, measured as the
bounded quantity itself (bytes held, fragments kept, bytes unsent), never as a duration.

Here a real server, Redis, worker and client socket; the server protocol fed raw frames in
memory is in tests/unit/test_connection_memory.py.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from circles import CirclesService, Config
from circles.backend.redis_url import parse_redis_url
from circles.server import tls
from circles.worker.service import Worker

from ..play_client import sleep
from ..support import client_tls
from ..unit.test_connection_memory import requests

# --- end to end: a real server, Redis and worker, and a client socket that stops reading ------------


def _unsent(protocol) -> int:
    """What the server holds for its peer in Twisted's write buffer (over TLS, the TCP transport's,
    encrypted, and what the TLS layer has not encrypted yet)."""
    transport, waiting = protocol.transport, 0
    if hasattr(transport, "_appSendBuffer"):  # TLSMemoryBIOProtocol
        waiting = sum(map(len, transport._appSendBuffer))
        transport = transport.transport
    return waiting + len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def _stalled_client(port: int, circle: str, tls_ca=None) -> socket.socket:
    """A client socket past its opening handshake (run in a thread: it blocks), with a 4 kB
    receive buffer it will never read again."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(("127.0.0.1", port))
    if tls_ca is not None:
        client = client_tls(tls_ca).wrap_socket(client, server_hostname="localhost")
    client.sendall((f"GET /{circle} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += client.recv(1)  # one byte at a time: nothing of what follows is read
    assert b" 101 " in head.split(b"\r\n", 1)[0], head
    return client


@pytest.mark.parametrize("secure", [False, True], ids=["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_a_real_client_that_stops_reading_is_held_to_the_bound(redis_server, start, tls_files, secure):
    """40 plays of 250 kB each, on a socket the client never reads again (its receive buffer
    4 kB): the kernel's send buffer takes a few megabytes, the server held the rest (7.2 MB
    here); now at most twice --max-message-size (plus Twisted's own 64 KiB buffer), and the
    connection is given up and counted."""
    from .test_play_ws import CIRCLE as SERVED
    from .test_play_ws import serving

    limit = 256 * 1024
    service = start(CirclesService(Config(
        port=0, interface="127.0.0.1", tls=tls.load(tls_files["cert"], tls_files["key"]) if secure else None,
        circles=[SERVED], redis_url=redis_server.url, max_message_size=limit, rate_limit=0, slow_reader_timeout=1,
    ), reactor=reactor))
    [listening] = await service.when_listening()
    port = listening.getHost().port
    await serving(start(Worker(parse_redis_url(redis_server.url), [SERVED], lambda script, ctx: "x" * 250_000,
                               reactor=reactor, concurrency=4)))
    client = await threads.deferToThread(_stalled_client, port, SERVED, tls_files["ca"] if secure else None)
    [protocol] = service.factory.open_connections
    client.sendall(requests(*[("play", {"script": "s"})] * 40))  # and never reads again (40 small frames)
    most = 0
    while protocol in service.factory.open_connections:
        most = max(most, _unsent(protocol))
        await sleep(0.01)
    client.close()
    assert most <= 2 * limit + 64 * 1024 + 40 * 300, most
    assert most > limit  # the kernel's buffers were full: the bound was what held it
    [line] = [line for line in service.gateway.metrics.exposition().decode().splitlines()
              if line.startswith("circles_slow_reader_closes_total ")]
    assert float(line.split()[1]) == 1
