"""EagerServer on real sockets: what Twisted promises of a transport still holds when writes
go out at once and a drained connection closes without the writability round trip."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor, task, tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from circles.common.eager import close_at_once
from circles.server.http.eager import EagerServer, send_eagerly

from ..play_client import eventually
from ..support import RawTLSClient, source_digest


class Server(Protocol):
    """Runs ``script(protocol)`` once connected; records how the connection ended."""

    def __init__(self, script) -> None:
        self.script = script
        self.lost: Deferred = Deferred()
        self.lost_inside_call = False
        self._in_call = False

    def connectionMade(self) -> None:
        self._in_call = True
        try:
            self.script(self)
        finally:
            self._in_call = False

    def connectionLost(self, reason) -> None:
        self.lost_inside_call = self._in_call
        self.lost.callback([reason])  # in a list: a Failure given to callback() would errback


def listen(script):
    """A loopback port whose connections are EagerServer, running ``script``; (port, servers)."""
    servers: list = []

    def build(addr):
        protocol = Server(script)
        servers.append(protocol)
        return protocol

    port = reactor.listenTCP(0, _Factory(build), interface="127.0.0.1")
    assert send_eagerly(port)
    return port, servers


class _Factory(Factory):
    def __init__(self, build) -> None:
        self._build = build

    def buildProtocol(self, addr):
        return self._build(addr)


def read_all(port_number: int, rcvbuf: int = 0, delay: float = 0.0) -> bytes:
    """Connect, optionally wait, then read until the server closes (in a thread)."""
    import time
    with socket.socket() as s:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(30)
        s.connect(("127.0.0.1", port_number))
        time.sleep(delay)
        chunks = []
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest_twisted.ensureDeferred
async def test_writes_arrive_whole_and_in_order_when_the_kernel_takes_only_part():
    big = bytes(range(256)) * (16 * 4096)  # 16 MiB: far more than the socket buffers hold
    parts = [b"first|", big, b"|after-the-big-one|", b"x" * 1000, b"|last"]

    def script(protocol):
        for part in parts:
            protocol.transport.write(part)
        protocol.transport.writeSequence([b"|seq1", b"|seq2"])
        assert protocol.transport.dataBuffer or protocol.transport._tempDataBuffer  # some was queued
        protocol.transport.loseConnection()

    port, servers = listen(script)
    try:
        received = await deferToThread(read_all, port.getHost().port, 0, 0.2)
        assert received == b"".join(parts) + b"|seq1|seq2"
        [reason] = await servers[0].lost
        assert reason.check(ConnectionDone)
        assert isinstance(servers[0].transport, EagerServer)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_write_never_overtakes_queued_bytes_even_when_the_socket_has_room():
    def script(protocol):
        tcp.Server.write(protocol.transport, b"queued first|")  # as a partial send leaves bytes queued
        protocol.transport.write(b"then this")
        protocol.transport.loseConnection()

    port, servers = listen(script)
    try:
        assert await deferToThread(read_all, port.getHost().port) == b"queued first|then this"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_close_with_nothing_queued_comes_later_and_cleanly():
    def script(protocol):
        protocol.transport.write(b"hello")
        assert not protocol.transport.dataBuffer and not protocol.transport._tempDataBuffer  # sent at once
        protocol.transport.loseConnection()
        protocol.transport.write(b" and after")  # still delivered: Twisted flushes before closing

    port, servers = listen(script)
    try:
        received = await deferToThread(read_all, port.getHost().port)
        assert received == b"hello and after"
        [reason] = await servers[0].lost
        assert reason.check(ConnectionDone)
        assert not servers[0].lost_inside_call  # never from inside loseConnection
    finally:
        await port.stopListening()


async def accepted(servers: list) -> Server:
    while not servers:
        await task.deferLater(reactor, 0.01, lambda: None)
    return servers[0]


@pytest_twisted.ensureDeferred
async def test_close_at_once_sends_the_fin_before_the_reactor_turns_and_drops_what_comes_after():
    client = socket.socket()
    client.settimeout(5)

    def script(protocol):
        protocol.transport.write(b"bye")
        protocol.at_once = close_at_once(protocol.transport)
        protocol.transport.write(b" and after")  # the write side is shut: dropped
        chunks = []
        while chunk := client.recv(1024):  # blocks the reactor: the FIN must be there already
            chunks.append(chunk)
        protocol.received = b"".join(chunks)

    port, servers = listen(script)
    try:
        client.connect(("127.0.0.1", port.getHost().port))
        server = await accepted(servers)
        [reason] = await server.lost
        assert server.at_once is True and server.received == b"bye"
        assert reason.check(ConnectionDone) and not server.lost_inside_call
        assert client.recv(1024) == b""
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_close_at_once_with_bytes_queued_closes_the_usual_way():
    def script(protocol):
        tcp.Server.write(protocol.transport, b"queued|")  # as a partial send leaves bytes queued
        protocol.at_once = close_at_once(protocol.transport)
        protocol.transport.write(b"then this")  # Twisted's promise: flushed before the close

    port, servers = listen(script)
    try:
        assert await deferToThread(read_all, port.getHost().port) == b"queued|then this"
        [reason] = await servers[0].lost
        assert servers[0].at_once is False and reason.check(ConnectionDone)
    finally:
        await port.stopListening()


class TLSServer(Server):
    """Runs ``script(protocol)`` on the first bytes it reads (sent after the TLS handshake)."""

    def connectionMade(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        Server.connectionMade(self)


@pytest_twisted.ensureDeferred
async def test_close_at_once_over_tls_sends_the_fin_after_close_notify_and_reads_the_peers():
    """Over TLS the FIN follows the server's close_notify at once (before, the server waited for
    the peer's close_notify and the client always ended the TCP connection first); the
    connection still reads, and closes, cleanly, once the peer's close_notify comes."""
    import ssl

    import trustme
    from twisted.internet import ssl as twisted_ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory

    ca = trustme.CA()
    options = twisted_ssl.PrivateCertificate.loadPEM(
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.bytes()).options()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    clients: list = []

    def script(protocol):
        protocol.transport.write(b"bye")
        protocol.at_once = close_at_once(protocol.transport)
        protocol.raw = clients[0].raw_until_fin()  # blocks the reactor: close_notify and the FIN are there

    def build(addr):
        servers.append(TLSServer(script))
        return servers[-1]

    servers: list = []
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, _Factory(build)), interface="127.0.0.1")
    assert send_eagerly(port)
    try:
        client = await deferToThread(RawTLSClient, port.getHost().port, context)
        clients.append(client)
        await deferToThread(client.send, b"go")
        server = await accepted(servers)
        await eventually(lambda: hasattr(server, "raw"))
        assert server.at_once is True
        assert client.tls.read() == b"bye"
        assert client.tls.read() == b""  # then the server's close_notify (without it: SSLWantReadError)
        assert not server.lost.called  # half-closed: it waits for the client's close_notify
        client.close_notify()
        [reason] = await server.lost
        assert reason.check(ConnectionDone)
        client.sock.close()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_connection_whose_fin_has_gone_still_closes_on_a_later_turn():
    """After close_at_once's FIN over TLS, the peer's close_notify makes Twisted's TLS transport
    close the TCP connection: that close comes on a later turn, never from inside the call."""
    from circles.common.eager import _end_writing

    def script(protocol):
        assert _end_writing(protocol.transport)
        protocol.transport.loseConnection()

    port, servers = listen(script)
    try:
        assert await deferToThread(read_all, port.getHost().port) == b""
        [reason] = await servers[0].lost
        assert reason.check(ConnectionDone) and not servers[0].lost_inside_call
    finally:
        await port.stopListening()


def test_close_at_once_on_another_transport_only_loses_the_connection():
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    assert close_at_once(transport) is False and transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_abort_after_lose_ends_the_connection_once():
    def script(protocol):
        protocol.transport.loseConnection()
        protocol.transport.abortConnection()

    port, servers = listen(script)
    try:
        try:
            await deferToThread(read_all, port.getHost().port)
        except ConnectionResetError:
            pass  # an abort resets: expected
        [reason] = await servers[0].lost  # a second connectionLost would raise AlreadyCalledError
        assert reason.check(ConnectionAborted)
        await task.deferLater(reactor, 0.05, lambda: None)
    finally:
        await port.stopListening()


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_pauses_the_producer_then_resumes_it():
    producer = Producer()
    chunk = b"z" * 65536

    def script(protocol):
        protocol.transport.registerProducer(producer, True)
        for _ in range(64):  # 4 MiB to a reader that waits before reading
            protocol.transport.write(chunk)
        protocol.paused_after_writes = producer.paused
        protocol.transport.unregisterProducer()
        protocol.transport.loseConnection()

    port, servers = listen(script)
    try:
        received = await deferToThread(read_all, port.getHost().port, 4096, 0.3)
        assert received == chunk * 64
        await servers[0].lost
        assert servers[0].paused_after_writes >= 1  # backpressure as with Twisted's own transport
    finally:
        await port.stopListening()


# --- the Twisted code EagerServer was reviewed against ---------------------------------------

#: sha256 (first 16 hex digits) of each Twisted method whose behaviour the eager writes rely on or
#: mirror (the buffers and flags they read, the paths they take instead), as reviewed for the
#: Twisted line pyproject.toml pins. When Twisted changes one, this fails: read the new source against
#: circles/common/eager.py and circles/server/http/eager.py (or the isolated engine), carry over
#: what matters, and record the new digest.
TWISTED_SOURCES = {
    ("FileDescriptor", "write"): "3e46c97fc173bc7e",
    ("FileDescriptor", "writeSequence"): "1606f230d318191a",
    ("FileDescriptor", "loseConnection"): "e13b8468f05208ae",
    ("FileDescriptor", "doWrite"): "a986d7b1b1054e43",
    ("FileDescriptor", "_postLoseConnection"): "684e97f94f7e5041",
    ("FileDescriptor", "connectionLost"): "1e0b14c7c3f9d02d",
    ("Connection", "writeSomeData"): "2dd0d4209260b94e",
    ("Connection", "connectionLost"): "dd7a9a87035a2084",
    ("_AbortingMixin", "abortConnection"): "c948f3ef21c1822c",
    ("ConnectionMixin", "write"): "ea311df0946d3f99",  # the TLS paths EagerServer leaves to Twisted
    ("ConnectionMixin", "writeSequence"): "a892b82c72b8fe70",
    ("ConnectionMixin", "loseConnection"): "fc4b216ae210b045",
    ("Port", "doRead"): "d240fc123090ee23",  # builds each connection from port.transport
    # The pipe writer of a child process, which the isolated engine writes around when nothing is
    # queued (``_Child.send`` in circles/worker/isolation.py: it reads ``pipes[0]``, its ``fd`` and
    # the buffers and flags of FileDescriptor above).
    ("ProcessWriter", "__init__"): "680686970708190e",  # makes the fd non-blocking, watches it for its far end's close
    ("ProcessWriter", "write"): "bf0e8e07b455ced9",
    ("ProcessWriter", "writeSomeData"): "8498ffe6cdfcb850",
    ("ProcessWriter", "doRead"): "97532be52ab34a87",
    # A Unix connection's file descriptor passing, which EagerWrites (circles/common/eager.py)
    # leaves to Twisted while any is queued: it reads ``_sendmsgQueue``, which these fill and drain.
    ("_SendmsgMixin", "writeSomeData"): "bea6b41b8609e7c9",
    ("_SendmsgMixin", "sendFileDescriptor"): "5fb8217b72cdb829",
    # Twisted's TLS transport, after whose close_notify close_at_once sends the FIN: loseConnection
    # writes close_notify (at once, or not while data waits for the handshake or a producer), the
    # peer's close_notify closes the TCP connection (which EagerServer then closes on the next turn).
    ("BufferingTLSTransport", "loseConnection"): "3b78ec1fa7972cf7",
    ("TLSMemoryBIOProtocol", "loseConnection"): "5681a9bd1bd76930",
    ("TLSMemoryBIOProtocol", "_shutdownTLS"): "f72004ba90a03215",
    ("TLSMemoryBIOProtocol", "_flushSendBIO"): "c034168e4f0faf2c",
    ("TLSMemoryBIOProtocol", "_flushReceiveBIO"): "b45e129f60c44862",
    ("TLSMemoryBIOProtocol", "_tlsShutdownFinished"): "e78b042366fe0af0",
}


def _twisted_method(owner: str, method: str):
    from twisted.internet import process, unix
    from twisted.protocols import tls

    classes = {cls.__name__: cls for cls in (*tcp.Server.__mro__, tcp.Port, process.ProcessWriter, unix._SendmsgMixin,
                                             *tls.BufferingTLSTransport.__mro__)}
    return vars(classes[owner])[method]


@pytest.mark.parametrize("owner, method", sorted(TWISTED_SOURCES))
def test_the_twisted_code_written_around_is_the_one_reviewed(owner, method):
    assert source_digest(_twisted_method(owner, method)) == TWISTED_SOURCES[owner, method]


def test_setup_pins_the_twisted_line_that_was_reviewed():
    # A Twisted outside the pinned line would fail the digests above at best; at worst it
    # would be installed where these tests never run.
    from importlib.metadata import requires, version

    pin = next(r for r in requires("circles-gateway") if r.startswith("twisted"))
    assert "<27" in pin and ">=26.10" in pin, pin
    assert version("twisted").startswith("26."), version("twisted")


def test_a_port_with_a_connection_class_of_its_own_gets_it_with_the_eager_ways_mixed_in():
    from twisted.internet import tcp

    from circles.server.processes.accept import SharedPort

    closed: list = []

    class Counted(tcp.Server):
        def connectionLost(self, reason) -> None:
            closed.append(reason)
            super().connectionLost(reason)

    port = reactor.listenTCP(0, _Factory(lambda addr: None), interface="127.0.0.1")
    try:
        port.transport = Counted
        assert send_eagerly(port)
        assert issubclass(port.transport, Counted) and issubclass(port.transport, EagerServer)
        assert port.transport.write is EagerServer.write and port.transport.connectionLost is Counted.connectionLost
        assert send_eagerly(port) and port.transport.__mro__[1] is Counted  # not mixed twice
    finally:
        port.stopListening()
    # --processes's shared port: its connections count themselves, and are eager too.
    assert issubclass(SharedPort.transport, tcp.Server) and SharedPort.transport is not tcp.Server


def test_client_connections_switch_to_eager_writes_and_others_are_left_alone():
    from twisted.internet import unix

    from circles.common.eager import EagerTCPClient, EagerUNIXClient, EagerWrites, send_eagerly_on

    class Fake:  # a test's or a custom reactor's transport
        pass

    fake = Fake()
    assert not send_eagerly_on(fake) and type(fake) is Fake
    for plain, eager in ((tcp.Client, EagerTCPClient), (unix.Client, EagerUNIXClient)):
        transport = plain.__new__(plain)  # the class is what is switched: no socket needed
        assert send_eagerly_on(transport) and type(transport) is eager and isinstance(transport, plain)
        assert send_eagerly_on(transport) and type(transport) is eager  # once is enough
    assert issubclass(EagerServer, EagerWrites)
