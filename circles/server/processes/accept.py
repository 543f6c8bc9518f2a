"""Who of ``--processes N`` accepts a connection: the one holding the fewest, or whoever has time.

The N processes accept from one listening socket (one queue), bound by the first process and
inherited by the others (:mod:`circles.server.processes.group`). On its own a shared queue gives
each connection to whichever process calls ``accept`` first: under load that is one with time to
spare (a busy process is not waiting in ``epoll``), but connections made while the server is
idle (a client opening its pool at start) fall to whichever wakes first, and measured 0/50, 49/1,
5/45 over runs of 50: worse than ``SO_REUSEPORT``'s hash of the 4-tuple (17/33 to 26/24), which
is blind to load, both ways (docs/benchmarks.md, "--processes: CPU per request and the spread of
connections").

So each process also says in :class:`Holdings` (shared memory, two numbers per process) how many
connections it holds and a turn (a random number it draws again each time it accepts), and takes
from the queue at once only while it comes first by (connections held, turn) among the
processes that accept: it holds the fewest, or as few as the fewest and drew the lowest turn
(a draw, not an order: a strict alternation would give every other connection to the same
process, as every WebSocket of a client that fetches a nonce over HTTP before each one). Then it
takes no more than brings it level with the next, and :data:`TURN` - 1 more (what is queued, if
less): no process leads another by more than that. A process that does
not come first stops accepting and looks every :data:`LOOK` at whether the one that came first
took its turn: once it did, this one takes its own, as if it had just woken; if it took none in
:data:`WAIT`, this one takes what is still queued. So one that is busy, stopped (``SIGSTOP``) or
dead delays a connection by :data:`WAIT` at most, and two that each saw the other first (a burst
of connections, as a pool opened at once makes) lose a millisecond, not the burst. 50
connections opened one after another split 25/25, 1,000 split 500/500; 50 opened at once split
25/25 too (before the looks: 1/49, 4/46, 17/33, the one that had waited taking all that was
queued), 3 processes 15-16/16-17/17-18; 500 opened at once 250/250, all accepted 85-97 ms after
the first connect (``bench/accept_burst.py``; one at a time a turn: 250-280 ms).

``epoll`` wakes every process waiting on the socket for each connection (the herd; no
``EPOLLEXCLUSIVE``, which would wake only the first, one that may not come first and waits):
with a few processes, a few wake-ups per connection, one of which accepts.
"""

from __future__ import annotations

import mmap
import os
import random
import struct
from typing import cast

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTime

#: Seconds a process that does not come first waits, at most, for the one that does to take its
#: turn (then it takes what is queued: that one is busy, stopped or dead).
WAIT = 0.01
#: Seconds between two looks, while it waits, at whether the one that came first took its turn
#: (then this one takes its own, as if it had just woken).
LOOK = 0.001
#: The connections held by a process that does not accept (not started, stopped listening, dead).
ABSENT = -1
#: The most connections a process that waited takes at once (Twisted's first accept loop).
AFTER_WAIT = 100
#: The connections a process that comes first takes beyond those that bring it level with the
#: next, plus one: a turn. More than one, so that a burst is not dealt one connection per LOOK;
#: few, so that a process leads another by TURN - 1 connections at most.
TURN = 4
_SLOT = struct.Struct("qq")  # per process: connections held, turn; aligned 64-bit words


class Holdings:
    """How many connections each of ``count`` processes holds (numbered 1 to ``count``) and
    when each last accepted, in memory shared through the descriptor ``fd``; :meth:`create`
    makes it (the first process), the others open it by its descriptor."""

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

    def _get(self, number: int) -> tuple[int, int]:
        return _SLOT.unpack_from(self._map, _SLOT.size * (number - 1))

    def set(self, number: int, held: int, took: bool = False) -> None:
        """Process ``number`` holds ``held`` connections (ABSENT: it does not accept); with
        ``took``, it has just accepted (it draws its turn again)."""
        turn = random.getrandbits(62) if took else self._get(number)[1]
        _SLOT.pack_into(self._map, _SLOT.size * (number - 1), held, turn)

    def get(self, number: int) -> int:
        """The connections process ``number`` holds (ABSENT: it does not accept)."""
        return self._get(number)[0]

    def first_but(self, number: int) -> tuple[int, int] | None:
        """(connections held, turn) of the accepting process other than ``number`` that comes
        first; None if no other accepts."""
        others = [self._get(n) for n in range(1, self.count + 1) if n != number]
        return min((score for score in others if score[0] >= 0), default=None)

    def score(self, number: int) -> tuple[int, int]:
        return self._get(number)


class _Held(tcp.Server):
    """A connection that tells its port when it closes."""

    def connectionLost(self, reason) -> None:
        try:
            super().connectionLost(reason)
        finally:
            cast("SharedPort", self.server).released()


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
    _seen: tuple[int, int] | None = None  # the score of the one that came first, as this one began to wait
    _since = 0.0  # when it began to wait

    def share(self, holdings: Holdings, number: int) -> None:
        self.holdings, self.number = holdings, number
        self._publish()

    def _publish(self, took: bool = False) -> None:
        if self.holdings is not None:
            accepting = self.connected and not self.disconnecting
            self.holdings.set(self.number, self.held if accepting else ABSENT, took)

    def startListening(self) -> None:
        super().startListening()
        self._publish()

    def doRead(self) -> None:
        holdings = self.holdings
        first = None if holdings is None else holdings.first_but(self.number)
        if holdings is None or first is None:
            self._accept()
        elif self._waited:
            self._accept(AFTER_WAIT)
        elif holdings.score(self.number) <= first:
            self._accept(max(1, first[0] - self.held) + TURN - 1)
        else:
            # Another comes first: its turn (it wakes for this connection too).
            self.stopReading()
            self._seen, self._since = first, cast(IReactorTime, self.reactor).seconds()
            self._later = cast(IReactorTime, self.reactor).callLater(LOOK, self._after_wait)

    def _after_wait(self) -> None:
        """Look again: the one that came first took its turn (its score moved), so this one takes
        its own; or WAIT passed and it took none, so this one takes what is queued; or wait on.

        Two that wait for each other (each saw the other first a moment before it accepted, as in
        a burst of connections: a pool opened at once) each look again within LOOK, not WAIT: the
        burst is dealt in turns, not left to whichever waited first."""
        self._later = None
        if not self.connected or self.disconnecting:
            return
        reactor = cast(IReactorTime, self.reactor)
        moved = self.holdings is None or self.holdings.first_but(self.number) != self._seen
        if not moved and reactor.seconds() - self._since < WAIT:
            self._later = reactor.callLater(LOOK, self._after_wait)
            return
        self._waited = not moved  # what is queued now, the one that came first had the time to take
        try:
            self.doRead()
        finally:
            self._waited = False
        if self._later is None:  # (not waiting again)
            self.startReading()

    def _accept(self, at_most: int | None = None) -> None:
        if at_most is not None:
            self.numberAccepts = at_most
        before = self.sessionno
        super().doRead()
        if self.sessionno != before:
            self.held += self.sessionno - before
            self._publish(took=True)

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
