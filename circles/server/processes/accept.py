"""Who of ``--processes N`` accepts a connection: the one holding the fewest, or whoever has time.

The N processes accept from one listening socket (one queue), bound by the first process and
inherited by the others (:mod:`circles.server.processes.group`). On its own a shared queue gives
each connection to whichever process calls ``accept`` first: under load that is one with time to
spare (a busy process is not waiting in ``epoll``), but connections made while the server is
idle (a client opening its pool at start) fall to whichever wakes first, and measured 0/50, 49/1,
5/45 over runs of 50: worse than ``SO_REUSEPORT``'s hash of the 4-tuple (17/33 to 26/24), which
is blind to load, both ways (docs/benchmarks.md, "--processes: CPU per request and the spread of
connections"). So each process also says how many connections it holds, in :class:`Holdings`
(shared memory: one number per process), and takes from the queue at once only while it holds
no more than the fewest any other accepting process holds, and then no more than one past them;
a process holding more waits :data:`WAIT` before taking what is still queued, which the others
had the time to take. A process that is busy, stopped (``SIGSTOP``) or dead delays a connection
by :data:`WAIT` at most; none is idle while another holds more connections than it does.

``epoll`` wakes every process waiting on the socket for each connection (the herd; no
``EPOLLEXCLUSIVE``, which would wake only the first, one that may hold the most and wait): with a
few processes, a few wake-ups per connection, one of which accepts.
"""

from __future__ import annotations

import mmap
import os
import struct

from twisted.internet import tcp

#: Seconds a process that holds more connections than another waits before accepting.
WAIT = 0.01
#: What a process's slot holds while it does not accept (not started, stopped listening, dead).
ABSENT = -1
#: The most connections a process that waited takes at once (Twisted's first accept loop).
AFTER_WAIT = 100
_SLOT = struct.Struct("q")  # one aligned 64-bit word per process: written whole


class Holdings:
    """How many connections each of ``count`` processes holds (numbered 1 to ``count``), in
    memory shared through the descriptor ``fd``; :meth:`create` makes it (the first process),
    the others open it by its descriptor."""

    def __init__(self, fd: int, count: int) -> None:
        self.fd = fd
        self.count = count
        self._map = mmap.mmap(fd, _SLOT.size * count)

    @classmethod
    def create(cls, count: int) -> Holdings:
        fd = os.memfd_create("circles-holdings")  # close-on-exec: a child gets it by childFDs
        os.ftruncate(fd, _SLOT.size * count)
        holdings = cls(fd, count)
        for number in range(1, count + 1):
            holdings.set(number, ABSENT)
        return holdings

    def set(self, number: int, held: int) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * (number - 1), held)

    def get(self, number: int) -> int:
        return _SLOT.unpack_from(self._map, _SLOT.size * (number - 1))[0]

    def fewest_but(self, number: int) -> int | None:
        """The fewest connections another accepting process holds; None if none accepts."""
        others = [self.get(n) for n in range(1, self.count + 1) if n != number]
        return min((held for held in others if held >= 0), default=None)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


class _Held(tcp.Server):
    """A connection that tells its port when it closes."""

    def loseConnection(self, *args, **kwargs):
        done = super().loseConnection(*args, **kwargs)
        self._publish()  # ABSENT from now on: the others no longer leave connections to this one
        return done

    stopListening = loseConnection

    def connectionLost(self, reason) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.server.released()


class SharedPort(tcp.Port):
    """A listening port whose socket other processes accept from too: once :meth:`share` gave it
    its number and the :class:`Holdings`, it accepts as the module's docstring says; until then
    (and with ``--reuse-port`` alone) as Twisted's port does."""

    transport = _Held

    holdings: Holdings | None = None
    number = 0
    held = 0  # connections accepted on this port and still open
    _later = None  # the delayed call taking what the others left queued
    _waited = False

    def share(self, holdings: Holdings, number: int) -> None:
        self.holdings, self.number = holdings, number
        self._publish()

    def _publish(self) -> None:
        if self.holdings is not None:
            self.holdings.set(self.number, self.held if self.connected and not self.disconnecting else ABSENT)

    def startListening(self) -> None:
        super().startListening()
        self._publish()

    def doRead(self) -> None:
        fewest = None if self.holdings is None else self.holdings.fewest_but(self.number)
        if fewest is None:
            self._accept()
        elif self.held <= fewest:
            self._accept(fewest + 1 - self.held)
        elif self._waited:
            self._accept(AFTER_WAIT)
        else:
            # Another holds fewer: its turn, for WAIT (it wakes for this connection too).
            self.stopReading()
            self._later = self.reactor.callLater(WAIT, self._after_wait)

    def _after_wait(self) -> None:
        self._later = None
        if not self.connected or self.disconnecting:
            return
        self._waited = True  # whatever is queued now, the others had the time to take
        try:
            self.doRead()
        finally:
            self._waited = False
        self.startReading()

    def _accept(self, at_most: int | None = None) -> None:
        if at_most is not None:
            self.numberAccepts = at_most
        before = self.sessionno
        super().doRead()
        if self.sessionno != before:
            self.held += self.sessionno - before
            self._publish()

    def released(self) -> None:
        self.held -= 1
        self._publish()

    def loseConnection(self, *args, **kwargs):
        done = super().loseConnection(*args, **kwargs)
        self._publish()  # ABSENT from now on: the others no longer leave connections to this one
        return done

    stopListening = loseConnection

    def connectionLost(self, reason) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        try:
            super().connectionLost(reason)
        finally:
            self._publish()  # not accepting: ABSENT
