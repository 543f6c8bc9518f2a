"""Helpers shared by the end-to-end tests: keys, signing with eth-account, twistd processes
(the process itself, devtools.twistd.Twistd, is shared with bench/)."""

from __future__ import annotations

import json
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import coincurve
from eth_account import Account
from eth_account.messages import encode_defunct

from devtools.twistd import TWISTD, Twistd

ROOT = Path(__file__).resolve().parent.parent


class Key:
    """A secp256k1 key pair as a test client holds it."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.private = coincurve.PrivateKey(secret)
        self.pubkey = self.private.public_key.format(compressed=True).hex()
        self.uncompressed = self.private.public_key.format(compressed=False).hex()

    def eth_sign(self, text: str) -> str:
        """``personal_sign`` of ``text`` by eth-account: the form MetaMask and ethers produce."""
        return Account.from_key(self.private.secret).sign_message(encode_defunct(text=text)).signature.hex()

    def der_sign(self, text: str) -> str:
        """ECDSA over SHA-256, DER encoded, by coincurve."""
        return self.private.sign(text.encode("utf-8")).hex()


def request(ws, method: str, params: Any = None, id_: Any = 1) -> dict:
    """Send one JSON-RPC request over a websockets sync connection and return the reply."""
    message = {"jsonrpc": "2.0", "method": method, "id": id_}
    if params is not None:
        message["params"] = params
    ws.send(json.dumps(message))
    return json.loads(ws.recv(timeout=30))


def authenticate(ws, key: Key) -> dict:
    nonce = request(ws, "fetch_nonce", {"pubkey": key.pubkey})["result"]["nonce"]
    return request(ws, "authenticate", {"pubkey": key.pubkey, "signature": key.eth_sign(nonce)})


class OneThreadAtATime(ssl.SSLSocket):
    """An ``ssl.SSLSocket`` whose OpenSSL object is used by one thread at a time.

    The ``websockets`` sync client reads in a thread of its own, blocked in ``recv()`` (inside
    OpenSSL's ``SSL_read``), while the caller's thread writes with ``sendall()`` (``SSL_write``) on
    the same socket; CPython's ``ssl`` does not serialise the two, and OpenSSL does not allow two
    threads in one ``SSL`` object. Over TLS 1.3 the server's NewSessionTicket messages arrive
    just after the handshake, when the client writes its upgrade request: the reading thread
    processes them while the writing thread sends, and now and then the request is lost (the
    client's ``sendall`` returns, nothing reaches the wire, the server waits for a request head,
    the client for its answer: "timed out while waiting for handshake response") or the write
    fails (``[SSL] internal error``, ``LENGTH_MISMATCH``).

    Here every call into OpenSSL (``recv``, ``recv_into``, ``send``, hence ``sendall``) holds a
    lock and does not block: it runs with the socket non-blocking, and the wait for the socket
    (with the caller's timeout, if any) is outside the lock, so a reader waiting for data never
    holds up a writer.
    """

    def _lock(self) -> threading.Lock:
        return self.__dict__.setdefault("_openssl_lock", threading.Lock())

    def _one_at_a_time(self, call, reading: bool, *args):
        lock, deadline = self._lock(), None
        while True:
            with lock:
                timeout = socket.socket.gettimeout(self)
                if timeout == 0.0:  # the caller's non-blocking call: as it is
                    return call(*args)
                socket.socket.settimeout(self, 0.0)
                try:
                    return call(*args)
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except BlockingIOError:  # a plain socket call (no TLS left on the socket)
                    events = select.POLLIN if reading else select.POLLOUT
                finally:
                    socket.socket.settimeout(self, timeout)
            wait = None
            if timeout is not None:
                deadline = deadline or time.monotonic() + timeout
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise TimeoutError(f"The {'read' if reading else 'write'} operation timed out")
            fd = self.fileno()
            if fd >= 0:  # else closed meanwhile: the next call says so
                poll = select.poll()
                poll.register(fd, events)
                poll.poll(None if wait is None else max(1, int(wait * 1000)))

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        return self._one_at_a_time(super().recv, True, buflen, flags)

    def recv_into(self, buffer, nbytes=None, flags: int = 0) -> int:
        return self._one_at_a_time(super().recv_into, True, buffer, nbytes, flags)

    def send(self, data, flags: int = 0) -> int:
        return self._one_at_a_time(super().send, False, data, flags)

    # What changes the socket's timeout, or drops its OpenSSL object, waits for a call in progress.

    def settimeout(self, value) -> None:
        with self._lock():
            super().settimeout(value)

    def gettimeout(self):
        with self._lock():
            return super().gettimeout()

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def getblocking(self) -> bool:
        return self.gettimeout() != 0.0

    def shutdown(self, how: int) -> None:
        with self._lock():
            super().shutdown(how)

    def close(self) -> None:
        with self._lock():
            super().close()


def client_tls(ca_pem: str) -> ssl.SSLContext:
    """A client context trusting ``ca_pem``, whose sockets are :class:`OneThreadAtATime` (the
    ``websockets`` sync client reads and writes one socket from two threads)."""
    context = ssl.create_default_context(cafile=ca_pem)
    context.sslsocket_class = OneThreadAtATime
    return context


class RawTLSClient:
    """A TLS client over a plain socket (``ssl.MemoryBIO``), so that a test sees the TCP stream
    under TLS: where it ends (the FIN) and what came before, record by record. Blocking."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 5) -> None:
        self.incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self._outgoing, server_hostname="localhost")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self.incoming.write(self.sock.recv(65536))

    def _flush(self) -> None:
        self.sock.sendall(self._outgoing.read())

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read_until(self, end: bytes) -> bytes:
        """Application bytes, one at a time, up to and including ``end``."""
        got = b""
        while not got.endswith(end):
            try:
                got += self.tls.read(1)
            except ssl.SSLWantReadError:
                chunk = self.sock.recv(65536)
                assert chunk, f"closed after {got!r}"
                self.incoming.write(chunk)
        return got

    def raw_until_fin(self) -> bytes:
        """What the TCP stream carries until the server's FIN (fed to the TLS reader too)."""
        raw = b""
        while chunk := self.sock.recv(65536):
            raw += chunk
        self.incoming.write(raw)
        return raw

    def close_notify(self) -> None:
        """Answer the server's close_notify with ours."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self._flush()


def source_digest(function) -> str:
    """The first 16 hex digits of the sha256 of ``function``'s source: what a test pins for
    third-party code we subclass or copy, so that a change upstream is read before it runs."""
    import hashlib
    import inspect

    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (exists and is not a zombie), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def still_open(socks: list) -> int:
    """How many of ``socks`` (plain or TLS) the server has not closed, each checked without
    blocking long; a socket that is answered (a refusal) counts as closed."""
    count = 0
    for sock in socks:
        sock.settimeout(0.01)
        try:
            if sock.recv(4096):
                continue
        except (TimeoutError, ssl.SSLWantReadError):
            count += 1
            continue
        except OSError:
            continue
    return count


def eventually_true(predicate, timeout: float = 60):
    """Poll ``predicate`` until it gives a true value or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@contextmanager
def twistd(args: list, cwd: Path, plugin: str = "circles", options: tuple = (),
           prefix: tuple = ()) -> Iterator[Twistd]:
    """``[prefix] twistd -n [options] plugin args`` (a prefix such as ``prlimit ...``), stopped
    (SIGTERM) when the block ends."""
    process = Twistd(args, cwd, plugin, options, prefix)
    try:
        yield process
    finally:
        process.stop()


def run_twistd_to_exit(args: list, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run twistd expecting it to refuse to start; return what it printed."""
    return subprocess.run([TWISTD, "-n", "--pidfile=", "circles", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def carry(source, sink) -> None:
    """All the ciphertext ``source`` has to send, written into ``sink`` (pyOpenSSL connections on
    memory BIOs)."""
    from OpenSSL import SSL

    while True:
        try:
            sink.bio_write(source.bio_read(2 ** 16))
        except SSL.WantReadError:
            return


def tls_pair(server_context, client_context, carry: Callable = carry, server=None) -> tuple:
    """A server and a client pyOpenSSL connection on memory BIOs (as Twisted's TLS makes them),
    past the handshake, whose flights ``carry(source, sink)`` takes from one to the other.
    ``server``: the server connection, made by the caller (``server_context`` is then unused)."""
    from OpenSSL import SSL

    server = SSL.Connection(server_context, None) if server is None else server
    client = SSL.Connection(client_context, None)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(4):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        carry(client, server)
        carry(server, client)
    return server, client
