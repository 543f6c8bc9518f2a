"""What one client can make the server hold for its connection, measured as the
bounded quantity itself (bytes held, fragments kept, bytes unsent), never as a duration.

In memory: a server protocol fed raw frames (what a hostile client sends need not be what any
client library would), its memory counted by ``tracemalloc``, its unsent bytes by a transport
with Twisted's own write buffer. A real server, Redis, worker and client socket:
tests/integration/test_connection_memory.py.
"""

from __future__ import annotations

import ctypes
import gc
import json
import tracemalloc
from contextlib import contextmanager

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import error
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import directlyProvides

from circles.protocol import CircleFactory
from circles.server.tls import load, release_buffers
from circles.tryout import devcert

from ..inmemory import session_layer
from ..support import carry, tls_pair
from .test_protocol import (  # noqa: F401 (fixtures)
    CIRCLE,
    Client,
    Transport,
    clock,
    connect,
    make_gateway,
    runner,
    txaio_clock,
)

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
    server = CircleFactory(session_layer(gateway)).buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
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


# --- an idle connection ------------------------------------------------------------------------------


class Discarding(Transport):
    """A transport that keeps nothing of what is written: what is measured is the server's."""

    def write(self, data: bytes) -> None:
        pass


UPGRADE = (f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode("ascii")
IDLE_CONNECTIONS = 500
#: Python heap bytes one open, idle connection may hold (its protocol, session, backlog, timers;
#: not its transport). 2.2 kB now; 8.2 kB when Autobahn's state was an instance dict, its opening
#: handshake was kept, its futures, validator and counters made for each, and each timer was a
#: DelayedCall of its own.
IDLE_HEAP_BOUND = 3000


def test_an_idle_connection_holds_little_of_the_heap(clock):
    """The bounded quantity: Python heap bytes per open, idle connection, over 500 of them, with
    the server's defaults (pings, idle timeout, rate limit, backlog bound all on)."""
    factory = CircleFactory(session_layer(make_gateway(clock)))
    addr = IPv4Address("TCP", "127.0.0.1", 8080)
    transports = [Discarding() for _ in range(IDLE_CONNECTIONS + 10)]
    for transport in transports[:10]:  # first use: caches, interned strings, lanes of timers
        server = factory.buildProtocol(addr)
        server.makeConnection(transport)
        server.dataReceived(UPGRADE)
    servers = []
    with held_bytes() as held:
        for transport in transports[10:]:
            server = factory.buildProtocol(addr)
            server.makeConnection(transport)
            server.dataReceived(UPGRADE)
            servers.append(server)
        per_connection = held() / IDLE_CONNECTIONS
    assert all(server.state == server.STATE_OPEN for server in servers)
    assert len(factory.open_connections) == IDLE_CONNECTIONS + 10
    assert per_connection < IDLE_HEAP_BOUND, per_connection


# --- fragmented messages ---------------------------------------------------------------------------


def test_one_byte_fragments_cost_what_theycarry(txaio_clock):
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


# --- replies a client does not read ----------------------------------------------------------------


class SlowPeer(FileDescriptor):
    """A transport with Twisted's own send buffer and producer pauses (``FileDescriptor``'s, as
    TCP's), whose peer reads only what the test lets it: ``unsent`` is that buffer's size."""

    def __init__(self, reactor) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.received = bytearray()
        self._budget = 0

    def getPeer(self):
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8080)

    @property
    def unsent(self) -> int:
        return len(self.dataBuffer) - self.offset + self._tempDataLen

    def writeSomeData(self, data) -> int:
        taken = min(len(data), self._budget)
        self._budget -= taken
        self.received += data[:taken]
        return taken

    def read(self, most: int = 1 << 62) -> None:
        """The peer reads up to ``most`` bytes (the server sends them as the socket would)."""
        self._budget = most
        while self._budget and self.unsent and not self.disconnected:
            lost = self.doWrite()
            if lost is not None:
                self._lost(lost)

    def abortConnection(self) -> None:
        self._lost(error.ConnectionAborted())

    def _lost(self, reason) -> None:
        if not self.disconnected:
            self.connectionLost(Failure(reason))  # FileDescriptor's: its buffers and producer go
            self.protocol.connectionLost(Failure(reason))


def open_slow(gateway):
    server = CircleFactory(session_layer(gateway)).buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
    peer = SlowPeer(MemoryReactorClock())
    peer.protocol = server
    server.makeConnection(peer)
    server.dataReceived(
        (f"GET /{CIRCLE} HTTP/1.1\r\nHost: localhost:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode("ascii"))
    assert server.state == server.STATE_OPEN
    peer.read()
    del peer.received[:]
    return server, peer


def messages(data: bytes) -> list:
    """The JSON messages in what a client read (server frames are not masked); a close frame as ('close', code)."""
    found, i = [], 0
    while i < len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length >= 126:
            width = 2 if length == 126 else 8
            length, i = int.from_bytes(data[i:i + width], "big"), i + width
        payload, i = bytes(data[i:i + length]), i + length
        found.append(("close", int.from_bytes(payload[:2], "big")) if opcode == 8 else json.loads(payload))
    return found


def requests(*calls) -> bytes:
    """Requests, one frame each, with ids 0, 1, ...: ``(method, params)`` (None: no params)."""
    return b"".join(frame(TEXT, json.dumps({"jsonrpc": "2.0", "id": i, "method": method,
                                            **({} if params is None else {"params": params})}).encode(), fin=True)
                    for i, (method, params) in enumerate(calls))


LIMIT = 64 * 1024  # --max-message-size in these tests: a connection may leave twice that unread
OUTPUT = 60_000  # a play's output: its reply is just under LIMIT


def test_play_replies_a_client_does_not_read_stay_within_the_bound(txaio_clock, runner):
    """Plays whose replies come back from Redis whatever the client reads. The server
    held them all; now what it holds is twice the message size (and the transport's 64 KiB), the
    rest answered -32007, and the connection lives on."""
    server, peer = open_slow(make_gateway(txaio_clock, runner, max_message_size=LIMIT, rate_limit=0))
    server.dataReceived(requests(*[("play", {"script": "s"})] * 20))
    assert len(runner.pending) == 20
    most = 0
    for d in runner.pending:
        d.callback("x" * OUTPUT)
        most = max(most, peer.unsent)
    assert most <= 2 * LIMIT + 64 * 1024, most  # was 1,200,000: all 20
    peer.read()  # the client reads after all: every play is answered, in order
    replies = messages(peer.received)
    assert [r["id"] for r in replies] == list(range(20))
    delivered = [r for r in replies if "result" in r]
    refused = [r for r in replies if "error" in r]
    assert 2 <= len(delivered) <= 3 and delivered[0]["result"] == {"output": "x" * OUTPUT}
    assert {r["error"]["code"] for r in refused} == {-32007}
    data = refused[-1]["error"]["data"]
    assert data["limit"] == 2 * LIMIT and data["size"] > OUTPUT and data["unread"] + data["size"] > 2 * LIMIT
    # Read up, the connection is as good as new.
    server.dataReceived(requests(("play", {"script": "again"})))
    runner.pending[-1].callback("x" * OUTPUT)
    peer.read()
    assert messages(peer.received)[-1]["result"] == {"output": "x" * OUTPUT}
    assert server.state == server.STATE_OPEN


def test_a_client_with_more_replies_unread_than_even_errors_fit_is_closed(txaio_clock, runner):
    """100 plays, 1 MiB each at the defaults, took 100 MiB a connection; here 6 MB. Once not even
    the -32007 errors fit, the client is given up at once (and counted)."""
    gateway = make_gateway(txaio_clock, runner, max_message_size=LIMIT, rate_limit=0)
    server, peer = open_slow(gateway)
    server.dataReceived(requests(*[("play", {"script": "s"})] * 100))
    most = 0
    for d in list(runner.pending):
        if not d.called:  # the connection's close cancels the plays still waiting
            d.callback("x" * OUTPUT)
        most = max(most, peer.unsent)
    assert most <= 2 * LIMIT + 64 * 1024, most  # was 6,000,000
    assert server.state == server.STATE_CLOSED and peer.disconnected
    assert _closed_slow_readers(gateway) == 1


def _closed_slow_readers(gateway) -> float:
    [line] = [line for line in gateway.metrics.exposition().decode().splitlines()
              if line.startswith("circles_slow_reader_closes_total ")]
    return float(line.split()[1])


def test_a_client_that_does_not_drain_in_time_is_closed_and_counted(txaio_clock, runner):
    gateway = make_gateway(txaio_clock, runner, max_message_size=LIMIT, rate_limit=0, slow_reader_timeout=30,
                           ping_interval=0, idle_timeout=0)
    slow, slow_peer = open_slow(gateway)
    reader, reader_peer = open_slow(gateway)
    for server in (slow, reader):
        server.dataReceived(requests(*[("play", {"script": "s"})] * 10))
    for d in runner.pending:
        d.callback("x" * OUTPUT)
    assert slow_peer.unsent > 2 * LIMIT and reader_peer.unsent > 2 * LIMIT  # both over the bound
    txaio_clock.advance(29)
    reader_peer.read()  # one reads in time
    txaio_clock.advance(2)
    assert slow.state == slow.STATE_CLOSED and slow_peer.disconnected
    assert reader.state == reader.STATE_OPEN and not reader_peer.disconnected
    assert _closed_slow_readers(gateway) == 1


def test_requests_already_read_wait_while_the_client_does_not_read(txaio_clock):
    """One read can bring hundreds of small requests, each answered at once with a large reply
    (the OpenRPC document, 10 kB): while the client does not read, the rest wait unprocessed."""
    server, peer = open_slow(make_gateway(txaio_clock, rate_limit=0))
    server.dataReceived(requests(*[("rpc.discover", None)] * 400))
    assert peer.unsent <= 64 * 1024 + 2 * 15_000, peer.unsent  # was 4.3 MB: all 400
    peer.read()  # once it reads, the rest are answered, in order
    assert [r["id"] for r in messages(peer.received)] == list(range(400))


# --- what a TLS connection's memory BIOs keep -----------------------------------------------------


def _c_heap() -> int:
    """Bytes glibc's malloc has handed out and not had back (OpenSSL's, which tracemalloc does not see)."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory):
    """A server context as Twisted makes them (release buffers on) and a client one, in memory."""
    from OpenSSL import SSL

    certs = devcert.make(str(tmp_path_factory.mktemp("certs")))
    server = SSL.Context(SSL.TLS_SERVER_METHOD)
    server.use_certificate_chain_file(certs["cert"])
    server.use_privatekey_file(certs["key"])
    server.set_mode(SSL.MODE_RELEASE_BUFFERS)
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    return server, client


def _read_all(connection) -> bytes:
    from OpenSSL import SSL

    got = b""
    try:
        while True:
            got += connection.recv(2 ** 15)
    except SSL.WantReadError:
        return got


def test_a_tls_connection_lets_go_of_the_largest_read_it_ever_made(tls_contexts):
    """A memory BIO keeps the largest buffer it ever needed: a connection that once read 64 KiB
    at a time (as Twisted reads a large message) held 85 kB for as long as it lived. Released,
    once nothing is on its way, the connection holds no more than one that never read it, and
    keeps working."""
    pairs = [tls_pair(*tls_contexts) for _ in range(40)]
    burst = b"x" * 16_000
    for server, client in pairs:
        for _ in range(4):
            client.send(burst)
        ciphertext = b""
        try:
            while True:
                ciphertext += client.bio_read(2 ** 16)
        except Exception:
            pass
        server.bio_write(ciphertext)  # one 64 kB read, as the reactor hands it over
        assert len(_read_all(server)) == 64_000
    gc.collect()
    before = _c_heap()
    assert all(release_buffers(server) for server, _ in pairs)
    gc.collect()
    released = (before - _c_heap()) / len(pairs)
    assert released > 64_000, released  # the 64 kB read's buffer, and the handshake's
    for server, client in pairs:  # the connections carry on, both ways, on their new buffers
        client.send(b"after")
        carry(client, server)
        assert _read_all(server) == b"after"
        server.send(b"reply")
        carry(server, client)
        assert _read_all(client) == b"reply"


def test_tls_buffers_are_not_let_go_while_ciphertext_is_on_its_way(tls_contexts):
    server, client = tls_pair(*tls_contexts)
    client.send(b"in flight")
    carry(client, server)  # written into the server's BIO, not yet read by it
    into = server._into_ssl
    assert not release_buffers(server)
    assert server._into_ssl is into
    assert _read_all(server) == b"in flight"
    server.send(b"out")  # and on its way out, not yet sent
    assert not release_buffers(server)
    carry(server, client)
    assert release_buffers(server) and server._into_ssl is not into
    assert not release_buffers(object())  # not a pyOpenSSL connection: nothing done


def test_over_tls_a_connection_lets_go_of_its_buffers_after_opening_and_after_large_messages(txaio_clock, tmp_path):
    """The wiring, in memory (Twisted's TLS on both sides, a Clock): a second after it opens, and a
    second after any read or write over 2 KiB, the connection's memory BIOs are new, empty ones;
    small messages set no timer."""
    certs = devcert.make(str(tmp_path))
    with open(certs["ca"]) as ca:
        client_options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca.read()))
    factory = CircleFactory(session_layer(make_gateway(txaio_clock, ping_interval=0, idle_timeout=0)))
    addr = IPv4Address("TCP", "127.0.0.1", 8443)
    server = TLSMemoryBIOFactory(load(certs["cert"], certs["key"]), False, factory, clock=txaio_clock).buildProtocol(addr)
    client_factory = WebSocketClientFactory(f"wss://localhost:8443/{CIRCLE}")
    client_factory.protocol = Client
    client = TLSMemoryBIOFactory(client_options, True, client_factory, clock=txaio_clock).buildProtocol(addr)
    server_transport = iosim.FakeTransport(server, isServer=True)
    directlyProvides(server_transport, ISSLTransport)  # as a TLS port's connections do
    pump = iosim.connect(server, server_transport, client, iosim.FakeTransport(client, isServer=False))

    def settle():
        for _ in range(10):
            pump.flush()
            txaio_clock.advance(0)

    def bios():
        handle = server.getHandle()
        return handle._into_ssl, handle._from_ssl

    settle()
    websocket, peer = server.wrappedProtocol, client.wrappedProtocol
    assert peer.opened and websocket.state == websocket.STATE_OPEN
    opened = bios()
    txaio_clock.advance(0.5)
    assert bios() == opened
    txaio_clock.advance(0.5)
    released = bios()
    assert released[0] != opened[0] and released[1] != opened[1]
    peer.call("whoami")  # small: nothing to let go of
    settle()
    assert peer.received[-1]["result"]["circle"] == CIRCLE
    assert len(factory.tls_buffer_timers) == 0
    peer.sendMessage(json.dumps({"jsonrpc": "2.0", "method": "rpc.discover", "id": 1, "pad": "p" * 5000}).encode())
    settle()  # a 5 kB read and a 10 kB write
    assert peer.received[-1]["id"] == 1 and peer.received[-1]["result"]["openrpc"]
    assert len(factory.tls_buffer_timers) == 1 and bios() == released
    txaio_clock.advance(1)
    assert bios()[0] != released[0]
    peer.call("whoami")  # and the connection carries on
    settle()
    assert peer.received[-1]["result"]["circle"] == CIRCLE
    peer.sendClose(1000)
    settle()
    assert len(factory.tls_buffer_timers) == 0 and factory.open_connections == set()
