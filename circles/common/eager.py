"""Stream connections that send at once when nothing is queued, as asyncio's transports do.

Twisted's ``FileDescriptor.write`` always queues: it asks the reactor to watch the socket for
writability (an ``epoll_ctl``), sends on the next loop turn, then stops watching (another
``epoll_ctl``). For a connection whose every message is small (a reply frame to a client, a
command to Redis) that is three system calls and a reactor turn where one ``send`` would do.

:class:`EagerWrites` tries ``send`` first when the connection's buffer is empty and queues only
what the kernel did not take, so order, backpressure (the buffer and producers work as before)
and error handling (a failed send leaves the bytes queued, and the reactor's next write reports
the loss the usual way) are Twisted's own. TLS connections, and a Unix connection with file
descriptors to pass, keep Twisted's path whole. The server's client connections are
``circles.server.http.eager.EagerServer``; :func:`send_eagerly_on` switches a client connection
(the workers' and servers' to Redis) once it is made.

It reads Twisted's private buffers and flags (``_tempDataBuffer``, ``_writeDisconnecting``,
``_writeDisconnected``, ``_sendmsgQueue``), here and in the server's module only, so
``pyproject.toml`` pins Twisted's line and ``tests/unit/test_eager.py`` holds digests of the
Twisted code reviewed: a new Twisted that changes any of it fails there first.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import tcp, unix


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


def send_eagerly_on(transport: object) -> bool:
    """Make ``transport``, a client connection just made, send at once from now on; True if it
    could (a plain TCP or Unix connection of the reactor's own: not TLS, nor a test's fake)."""
    eager = _EAGER.get(type(transport))
    if eager is not None:
        transport.__class__ = eager  # the same object and state, a subclass's write
    return isinstance(transport, EagerWrites)
