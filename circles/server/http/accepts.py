"""Accepted TCP connections, counted from ``accept()`` so the process never runs out of descriptors.

Every connection holds a file descriptor from the moment it is accepted, long before it is a
WebSocket. When a crowd of silent connections took them all, ``accept()`` failed with EMFILE:
Twisted then closed whatever it could accept, logging a line per connection, and every other
client was reset until the handshake timeout freed some. Here the listening ports count what
they accept, in all, and refuse (close at once, inside the accept loop, before any protocol is
built) once the count reaches the process's descriptor limit less a reserve. The reserve keeps
descriptors for everything else (Redis, logs, request bodies spooled to temporary files) and
for the next ``accept()``, so the server keeps accepting and refusing instead of failing.

The gate sits on the port, outside TLS (a TLS port's factory wraps the router, which cannot
decline a connection there), and counts on the port's transport class, whose
``connectionLost`` Twisted calls exactly once per accepted connection, whatever protocol took
the connection over since.
"""

from __future__ import annotations

import resource

from twisted.internet import tcp
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure

from circles.common.logs import Logger, worth_logging
from circles.server.http.eager import EagerServer

log = Logger()


def descriptor_limit() -> int:
    """The process's soft RLIMIT_NOFILE; 0 when there is none."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 0 if soft == resource.RLIM_INFINITY else soft


class AcceptGate:
    """Connections accepted and not yet closed, by every port it is installed on; at most ``limit``
    (0: no limit), past which the port closes new connections at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0

    @classmethod
    def below_descriptor_limit(cls, reserve: int) -> AcceptGate:
        """A gate leaving ``reserve`` descriptors of the soft RLIMIT_NOFILE to the rest."""
        nofile = descriptor_limit()
        if not nofile:
            return cls(0)
        limit = nofile - reserve
        if limit < 1:
            limit = max(1, nofile // 2)
            log.warn("the descriptor limit ({nofile}) is not above --fd-reserve ({reserve}): "
                     "accepting at most {limit} connections", nofile=nofile, reserve=reserve, limit=limit)
        return cls(limit)

    def install(self, port) -> bool:
        """Count (and bound) the connections ``port`` accepts from now on; True if it could.

        Works on a ``twisted.internet.tcp.Port`` whose connections are
        :class:`~circles.server.http.eager.EagerServer` (see :func:`~circles.server.http.eager.send_eagerly`); other
        ports are left as they are.
        """
        if not isinstance(port, tcp.Port) or port.transport is not EagerServer:
            return False
        port.factory = _GatedFactory(self, port.factory)
        port.transport = CountedServer
        return True

    def _refuse(self, addr) -> None:
        self.refused += 1
        if worth_logging(self.refused):
            log.warn("refused a connection from {peer}: {open} connections open, the most the descriptor "
                     "limit allows (RLIMIT_NOFILE less --fd-reserve); {n} refused so far",
                     peer=getattr(addr, "host", addr), open=self.open, n=self.refused)


class _GatedFactory(Factory):
    """The port's factory: the real one (the router, or TLS around it) behind the gate."""

    def __init__(self, gate: AcceptGate, wrapped) -> None:
        self.gate = gate
        self.wrapped = wrapped

    def buildProtocol(self, addr):
        gate = self.gate
        if gate.limit and gate.open >= gate.limit:
            gate._refuse(addr)
            return None  # the port closes the socket at once
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is not None:
            gate.open += 1  # the port makes a CountedServer for it, which gives it back
        return protocol

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def logPrefix(self) -> str:
        return self.wrapped.__class__.__name__


class CountedServer(EagerServer):
    """An :class:`EagerServer` that gives its place back to the gate when it closes."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.disconnected:
            self.server.factory.gate.open -= 1  # type: ignore[union-attr]  # the port's: a _GatedFactory
        super().connectionLost(reason)
