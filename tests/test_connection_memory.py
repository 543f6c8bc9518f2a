"""Issue 23: what one client can make the server hold for its connection, measured as the
bounded quantity itself (bytes held, fragments kept, bytes unsent), never as a duration.

In memory first: a server protocol fed raw frames (what a hostile client sends need not be
what any client library would), its memory counted by ``tracemalloc``.
"""

from __future__ import annotations

import gc
import tracemalloc
from contextlib import contextmanager

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure

from circles.protocol import CircleFactory

from .test_protocol import CIRCLE, Transport, clock, connect, make_gateway, txaio_clock  # noqa: F401 (fixtures)

TEXT, CONTINUATION = 0x1, 0x0


def frame(opcode: int, payload: bytes, fin: bool) -> bytes:
    """One client frame, masked with a zero key (the payload goes as it is)."""
    length = len(payload)
    if length < 126:
        head = bytes([0x80 * fin | opcode, 0x80 | length])
    elif length < 65536:
        head = bytes([0x80 * fin | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x80 * fin | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def open_raw(gateway):
    """A server protocol past its opening handshake, on a transport that keeps what it writes."""
    server = CircleFactory(gateway).buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
    transport = Transport()
    server.makeConnection(transport)
    server.dataReceived(
        (f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode("ascii"))
    assert server.state == server.STATE_OPEN
    transport.clear()
    return server, transport


@contextmanager
def held_bytes():
    """``held()`` inside the block: bytes allocated since it began and still alive. The cyclic
    garbage collector is off meanwhile, so what is freed is freed by its last reference going."""
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        yield lambda: tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        gc.enable()


# --- fragmented messages ---------------------------------------------------------------------------


def test_one_byte_fragments_cost_what_they_carry(txaio_clock):
    """Autobahn kept some 40 bytes per fragment (a 1 MiB message in 1-byte fragments: 53 MB);
    gathered as they arrive, a message's fragments hold about what they carry."""
    server, _ = open_raw(make_gateway(txaio_clock))
    fragments = 4000  # under the default cap of 4096
    with held_bytes() as held:
        server.dataReceived(frame(TEXT, b"[", fin=False))
        server.dataReceived(frame(CONTINUATION, b"1", fin=False) * (fragments - 1))
        kept = held()
    assert server.state == server.STATE_OPEN
    assert kept < 2 * fragments + 4096, kept  # was 170 kB: 42 bytes a fragment


def test_a_message_in_too_many_fragments_closes_1009(txaio_clock):
    server, transport = open_raw(make_gateway(txaio_clock, max_fragments=100))
    with held_bytes() as held:
        server.dataReceived(frame(TEXT, b"[", fin=False))
        server.dataReceived(frame(CONTINUATION, b"", fin=False) * 10_000)  # empty ones never reach the size limit
        kept = held()
    close = transport.value()
    assert close[:2] == b"\x88\x1f" and int.from_bytes(close[2:4], "big") == 1009, close
    assert close[4:] == b"message in too many fragments"
    assert server.state == server.STATE_CLOSING
    assert kept < 16 * 1024, kept  # the rest of the message is dropped as it arrives


def test_fragments_under_the_cap_make_one_message(txaio_clock):
    conn = connect(make_gateway(txaio_clock, max_fragments=4))  # three, and Autobahn's empty final one
    conn.client.beginMessage(isBinary=False)
    for part in (b'{"jsonrpc":"2.0",', b'"method":"whoami",', b'"id":7}'):
        conn.client.sendMessageFrame(part)
    conn.client.endMessage()
    conn.settle()
    [reply] = conn.client.received
    assert reply["id"] == 7 and reply["result"]["circle"] == CIRCLE


def test_a_closed_connection_keeps_nothing_of_its_unfinished_message(txaio_clock):
    """What a connection held for a message it never finished is freed as it closes, not at
    the garbage collector's next full pass (Autobahn's ``is_closed`` keeps the protocol in a
    reference cycle)."""
    server, transport = open_raw(make_gateway(txaio_clock))
    with held_bytes() as held:
        server.dataReceived(frame(TEXT, b"[" + b"0," * 250_000, fin=False))
        server.dataReceived(frame(CONTINUATION, b"0," * 100, fin=False))
        assert held() > 500_000
        server.connectionLost(Failure(error.ConnectionLost()))
        del server, transport
        kept = held()
    assert kept < 64 * 1024, kept  # was the whole 500 kB message
