"""Accepted TCP connections that send at once when nothing is queued (circles.common.eager),
and close at once when nothing is left to send.

:class:`EagerServer` writes as :class:`~circles.common.eager.EagerWrites` does: on the
``fetch_nonce`` benchmark Twisted's queued writes were a third of the server's time per call.
``loseConnection`` with nothing left to flush closes at the end of the reactor's turn
(:class:`circles.common.event_loop.TurnEnd`) instead of first waiting for writability (which
cost two ``epoll_ctl`` and an empty ``send`` per connection);
``connectionLost`` still comes later, never from inside ``loseConnection``
(:func:`circles.common.eager.close_at_once`, for a protocol that has said its last word, sends
the FIN before that).
:func:`send_eagerly` switches a listening ``twisted.internet.tcp.Port`` to it; other ports (a
custom reactor's) are left as they are.

It reads ``tcp.Server``'s private buffers and flags (``_tempDataBuffer``, ``_writeDisconnecting``,
``_writeDisconnected``, ``_aborting``), here and in circles.common.eager only, so
``pyproject.toml`` pins Twisted's line (as it pins Autobahn's) and ``tests/unit/test_eager.py``
holds digests of the Twisted code reviewed: a new Twisted that changes any of it fails there first.
"""

from __future__ import annotations

from twisted.internet import main, tcp
from twisted.python.failure import Failure

from circles.common.eager import EagerWrites
from circles.common.event_loop import TurnEnd


class EagerServer(EagerWrites, tcp.Server):
    """A server-side TCP connection whose ``write`` sends at once when nothing is queued."""

    def loseConnection(self) -> None:
        if self.connected and not self.disconnecting and self._writeDisconnected:
            # Its FIN has gone (circles.common.eager.close_at_once, over TLS before the peer's
            # close_notify): Twisted would close from inside this call, and so call the
            # protocols' connectionLost from inside their own dataReceived.
            self.stopReading()
            self.stopWriting()
            self.disconnecting = 1
            TurnEnd(self.reactor).callLater(0, self._close_now)
            return
        if (self.connected and not self.disconnecting and not self.TLS
                and not self._writeDisconnecting and not self._writeDisconnected
                and not self.dataBuffer and not self._tempDataBuffer
                and (self.producer is None or (self.streamingProducer and not self.producerPaused))):
            self.stopReading()
            self.disconnecting = 1
            TurnEnd(self.reactor).callLater(0, self._close_now)
            return
        super().loseConnection()

    def _close_now(self) -> None:
        if self.disconnected or self._aborting:
            return
        if self.dataBuffer or self._tempDataBuffer:
            # Written after loseConnection: Twisted's path flushes, then closes.
            self.startWriting()
            return
        self.connectionLost(Failure(main.CONNECTION_DONE))


def send_eagerly(port) -> bool:
    """Make connections accepted by ``port`` from now on :class:`EagerServer`s (a port whose
    connections are a ``tcp.Server`` of its own, as ``--processes``'s shared port's, gets that
    class with EagerServer's ways mixed in); True if it could."""
    if not isinstance(port, tcp.Port) or not isinstance(port.transport, type):
        return False
    if port.transport is tcp.Server:
        port.transport = EagerServer
    elif issubclass(port.transport, tcp.Server) and not issubclass(port.transport, EagerServer):
        mixed: type[tcp.Server] = type(f"Eager{port.transport.__name__}", (port.transport, EagerServer), {})
        port.transport = mixed
    return issubclass(port.transport, EagerServer)
