"""Stream connections that send at once when nothing is queued, as asyncio's transports do.

Twisted's ``FileDescriptor.write`` always queues: it asks the reactor to watch the socket for
writability (an ``epoll_ctl``), sends on the next loop turn, then stops watching (another
``epoll_ctl``). For a connection whose every message is small (a reply frame to a client, a
command to Redis) that is three system calls and a reactor turn where one ``send`` would do.

:class:`EagerWrites` tries ``send`` first when the connection's buffer is empty and queues only
what the kernel did not take, so order, backpressure (the buffer and producers work as before)
and error handling (a failed send leaves the bytes queued, and the reactor's next write reports
the loss the usual way) are Twisted's own. TLS connections, and a Unix connection with file
descriptors to pass, keep Twisted's path whole. :func:`close_at_once` is ``loseConnection`` with
the FIN sent at once, for a protocol that writes nothing more; :func:`close_in_order` adds a
deadline to a close that waits on the peer. The server's client connections are
``circles.server.http.eager.EagerServer``; :func:`send_eagerly_on` switches a client connection
(the workers' and servers' to Redis) once it is made.

It reads Twisted's private buffers and flags (``_tempDataBuffer``, ``_writeDisconnecting``,
``_writeDisconnected``, ``_sendmsgQueue``), here and in the server's module only, so
``pyproject.toml`` pins Twisted's line and ``tests/unit/test_eager.py`` holds digests of the
Twisted code reviewed: a new Twisted that changes any of it fails there first.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import Any

from OpenSSL import SSL
from twisted.internet import tcp, unix
from twisted.internet.interfaces import IDelayedCall
from twisted.protocols.tls import TLSMemoryBIOProtocol


class EagerWrites(tcp.Connection):
    """``write`` for a Twisted stream connection (first in its bases): at once when nothing is queued."""

    def write(self, data: bytes) -> None:
        if (self.dataBuffer or self._tempDataBuffer or self.TLS or not self.connected or self.disconnecting
                or self._writeDisconnecting or self._writeDisconnected or getattr(self, "_sendmsgQueue", None)
                or not isinstance(data, bytes)):
            super().write(data)  # Twisted's own path: queue, or refuse, or drop
            return
        try:
            sent = self.socket.send(data)
        except OSError:
            sent = 0  # would block, or failed: queued below; doWrite reports a real error
        if sent < len(data):
            super().write(data[sent:] if sent else data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self.dataBuffer or self._tempDataBuffer or self.TLS:
            super().writeSequence(iovec)
        else:
            self.write(b"".join(iovec))


class EagerTCPClient(EagerWrites, tcp.Client):
    """A client TCP connection that sends at once when nothing is queued."""


class EagerUNIXClient(EagerWrites, unix.Client):
    """A client Unix connection that sends at once when nothing is queued."""


_EAGER = {tcp.Client: EagerTCPClient, unix.Client: EagerUNIXClient}


def close_at_once(transport: Any) -> bool:
    """``transport.loseConnection()``, and for an :class:`EagerWrites` connection with nothing
    left to send, the FIN at once (``shutdown(SHUT_WR)``) rather than with the close, which
    Twisted makes on a later turn of the reactor; True if it went at once. For a protocol that
    writes nothing more: what is written after is dropped, as after a half-close.

    A WebSocket server after its closing handshake is one: RFC 6455 7.1.1 wants the server to end
    the TCP connection first, so that the TIME_WAIT is the server's and not the client's (which
    could not reuse that address and port for two minutes); on a busy server the later turn came
    so late that the client's FIN came first on several connections in a hundred.

    Over TLS (Twisted's TLS transport over an eager connection) the FIN follows the close_notify
    that ``loseConnection`` wrote, and the connection still reads: Twisted closes it once the
    peer's close_notify comes (RFC 8446 6.1: each side sends close_notify before closing its
    write side, and need not wait for the other's). Waiting for the peer's close_notify first,
    as Twisted does, let every client end the TCP connection before the server."""
    transport.loseConnection()
    if isinstance(transport, TLSMemoryBIOProtocol):
        if (transport._aborted or not transport.disconnecting
                or not transport._tlsConnection.get_shutdown() & SSL.SENT_SHUTDOWN):
            return False  # close_notify not written yet (data held for the handshake, a producer)
        return _end_writing(transport.transport)
    return isinstance(transport, EagerWrites) and bool(transport.disconnecting) and _end_writing(transport)


#: Seconds a peer that has all we sent gets to finish a close (to answer TLS's close_notify)
#: before the connection is aborted: see :func:`close_in_order`.
CLOSE_GRACE = 2.0


def close_in_order(transport: Any, call_later: Callable[..., IDelayedCall], unread_grace: float) -> IDelayedCall | None:
    """:func:`close_at_once`, and a deadline on a close that waits on the peer, after which the
    connection is aborted: :data:`CLOSE_GRACE` for its close_notify (TLS), ``unread_grace``
    seconds to read what is still queued for it (0: no deadline). The deadline, which the
    caller cancels when the connection is lost; None if there is none.

    Without it a close waited as long as the peer liked: Twisted's TLS transport for the
    peer's close_notify, ``loseConnection`` for the queue to drain, with no timer of the
    protocol's left to end it (a WebSocket closed, an HTTP answer with ``Connection: close``)."""
    at_once = close_at_once(transport)
    if at_once and not isinstance(transport, TLSMemoryBIOProtocol):
        return None  # the FIN has gone, the close follows on the next turn
    grace = CLOSE_GRACE if at_once else unread_grace
    return call_later(grace, transport.abortConnection) if grace > 0 else None


def _end_writing(connection: Any) -> bool:
    """``shutdown(SHUT_WR)`` on an :class:`EagerWrites` connection with nothing left to send,
    and Twisted's flag that drops what is written after; True if it did."""
    if not (isinstance(connection, EagerWrites) and connection.connected and not connection.disconnected
            and not connection.TLS and not connection._writeDisconnecting and not connection._writeDisconnected
            and not connection.dataBuffer and not connection._tempDataBuffer
            and not getattr(connection, "_sendmsgQueue", None)):
        return False
    try:
        connection.socket.shutdown(socket.SHUT_WR)
    except OSError:
        return False  # (the peer is gone already) the close reports it
    connection._writeDisconnected = True  # Twisted's write drops what comes after, as after loseWriteConnection
    return True


def send_eagerly_on(transport: object) -> bool:
    """Make ``transport``, a client connection just made, send at once from now on; True if it
    could (a plain TCP or Unix connection of the reactor's own: not TLS, nor a test's fake)."""
    eager = _EAGER.get(type(transport))
    if eager is not None:
        transport.__class__ = eager  # the same object and state, a subclass's write
    return isinstance(transport, EagerWrites)
