"""The tests' TLS client (``support.client_tls``) never has two threads in one OpenSSL object.

The ``websockets`` sync client, which the end-to-end tests use, reads in a thread of its own
while the test's thread writes, on one ``ssl.SSLSocket``. With Python's own sockets both calls
went into OpenSSL at once, which OpenSSL does not allow: over TLS 1.3 the server's session
tickets, read just after the handshake, met the write of the upgrade request, and one
connection in several hundred lost its request (the server waited for a request head, the client
for the answer: "timed out while waiting for handshake response"): about one run in ten of
``tests/test_twistd.py`` failed so. Each test here watches the socket's OpenSSL object and fails
on the first call made while another thread's is still in it.
"""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from websockets.sync.client import connect
from websockets.sync.server import serve

from ..support import client_tls


class _Watched:
    """An ``SSLSocket``'s OpenSSL object that counts the calls in it at once."""

    def __init__(self, sslobj) -> None:
        self._sslobj = sslobj
        self._count = threading.Lock()
        self.inside = 0
        self.most = 0  # the most calls in it at once
        self.reading = threading.Event()  # a read has started

    def _call(self, name: str, *args):
        with self._count:
            self.inside += 1
            self.most = max(self.most, self.inside)
        if name == "read":
            self.reading.set()
        try:
            return getattr(self._sslobj, name)(*args)
        finally:
            with self._count:
                self.inside -= 1

    def read(self, *args):
        return self._call("read", *args)

    def write(self, *args):
        return self._call("write", *args)

    def __getattr__(self, name):
        return getattr(self._sslobj, name)


@pytest.fixture
def tls_server(tls_files):
    """A TLS 1.3 server (Python's, with OpenSSL's two session tickets after each handshake) that
    reads one request line and answers ``ok``; its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files["cert"], tls_files["key"])
    listener = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls_socket:
                    head = b""
                    while not head.endswith(b"\r\n"):
                        data = tls_socket.recv(1024)
                        if not data:
                            return
                        head += data
                    tls_socket.sendall(b"ok " + head)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_a_write_waits_while_another_thread_waits_to_read(tls_server, tls_files):
    """The pattern of the websockets client, in order: one thread waits in recv() (before the
    server's session tickets, which it will read), then another writes. The write goes through
    at once, never into OpenSSL while the read is in it, and the answer reaches the reader."""
    raw = socket.create_connection(("127.0.0.1", tls_server), timeout=5)
    client = client_tls(tls_files["ca"]).wrap_socket(raw, server_hostname="localhost")
    assert client.version() == "TLSv1.3"
    client.settimeout(None)  # as websockets leaves it: blocking
    watched = client._sslobj = _Watched(client._sslobj)
    answers = []
    reader = threading.Thread(target=lambda: answers.append(client.recv(1024)), daemon=True)
    reader.start()
    assert watched.reading.wait(5)
    writer = threading.Thread(target=client.sendall, args=(b"hello\r\n",), daemon=True)
    writer.start()
    writer.join(5)
    reader.join(5)
    try:
        assert not writer.is_alive() and not reader.is_alive()
        assert watched.most == 1
        assert answers == [b"ok hello\r\n"]
        assert watched.session.has_ticket  # the tickets were read, by the reader
    finally:
        try:
            client.shutdown(socket.SHUT_RDWR)  # a reader still waiting wakes up
        except OSError:
            pass
        client.close()


def test_the_websockets_client_never_has_two_threads_in_openssl(tls_files):
    """websockets' own client and server, TLS 1.3, connection after connection: each answered, and
    no call into the client's OpenSSL object while another thread's is in it."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tls_files["cert"], tls_files["key"])

    def echo(ws) -> None:
        for message in ws:
            ws.send(message)

    context = client_tls(tls_files["ca"])
    watched = []

    class Watching(context.sslsocket_class):
        def do_handshake(self, *args, **kwargs):
            super().do_handshake(*args, **kwargs)
            self._sslobj = _Watched(self._sslobj)
            watched.append(self._sslobj)

    context.sslsocket_class = Watching
    with serve(echo, "127.0.0.1", 0, ssl=server_context) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        for i in range(100):
            with connect(f"wss://localhost:{port}/", ssl=context, open_timeout=5) as ws:
                ws.send(f"hello {i}")
                assert ws.recv(timeout=5) == f"hello {i}"
        server.shutdown()
    assert len(watched) == 100
    assert max(w.most for w in watched) == 1
