"""Many timers on one clock behind few calls of it: a :class:`TimerLane` holds the timers of one
delay behind a single call, and :class:`TimerLanes` a lane per delay, each lane made when first
needed and let go once it holds no timer and its call has come (or at once, past a few lanes).

A ``DelayedCall`` costs some 400 bytes, and the reactor keeps it in a heap compared in Python:
each one set and cancelled costs several comparisons, and every other call of the clock (a
``callLater(0)`` included) sifts through all of them. A timer in a lane is an entry of an
ordered dict. The server's connections (their idle and Autobahn's timers) and its plays waiting
for a reply (their deadlines) keep theirs here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from circles.common.logs import Logger

log = Logger()


class TimerLane:
    """Timers of one delay on one clock, all behind a single call of the clock.

    A timer is a key (any hashable object: a connection, a task id) and its deadline, ``delay``
    seconds after it was set. The clock only moves forward, so a lane's timers come due in the
    order they were set (or last :meth:`reset`): an insertion-ordered dict holds them, and one
    call of the clock, at the first one's deadline, fires each as it comes due, with
    ``fire(key)``. Each deadline is exact, as a call of its own would be; a timer costs an entry
    of that dict (about 75 bytes) where a ``DelayedCall`` of its own costs some 400.

    (Should the wall clock step back, the timers set afterwards wait behind those set before,
    which are late by the step as a ``DelayedCall`` would be: none is later than that.)

    The call stays when the last timer is cancelled, and ends the lane's round when it comes,
    firing nothing: a timer set meanwhile is due no sooner than it (the delay is the lane's), so
    the call still comes first and arms the next. A lane that holds one timer at a time (a play
    waiting for its reply, while the server is not busy) would otherwise make and cancel a
    ``DelayedCall`` per timer: 2.4% of the server's instructions a play (docs/benchmarks.md,
    "Unbatched plays"). ``idle(lane)`` is called when the lane's call has come and left it empty.
    """

    __slots__ = ("_clock", "delay", "_fire", "_due", "_call", "_idle")

    def __init__(self, clock: IReactorTime, delay: float, fire: Callable[[Any], object],
                 idle: Callable[[TimerLane], object] | None = None) -> None:
        self._clock = clock
        self.delay = delay
        self._fire = fire
        self._idle = idle
        self._due: OrderedDict = OrderedDict()  # key -> deadline, the first due first
        self._call: IDelayedCall | None = None  # no later than the first deadline, while one may come

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def set(self, key: Hashable) -> None:
        """Fire ``key`` ``delay`` seconds from now (or, if it is set already, then instead)."""
        due = self._due
        when = self._clock.seconds() + self.delay
        if key in due:
            due.move_to_end(key)
        due[key] = when
        if self._call is None:
            self._call = self._clock.callLater(self.delay, self._expire)

    def reset(self, key: Hashable) -> None:
        """Fire ``key``, which is set, ``delay`` seconds from now instead (a ``KeyError`` if it is not)."""
        due = self._due
        due.move_to_end(key)
        due[key] = self._clock.seconds() + self.delay

    def cancel(self, key: Hashable) -> None:
        """Never fire ``key`` (if it is set). The lane's call stays (see above)."""
        self._due.pop(key, None)

    def stop(self) -> None:
        """Cancel the lane's call now, once it holds no timer (to let go of it at once)."""
        if self._call is not None and self._call is not _EXPIRING:
            self._call.cancel()
            self._call = None

    def _expire(self) -> None:
        self._call = _EXPIRING  # what the timers fired set is armed once they are done
        due = self._due
        now = self._clock.seconds()
        while due:
            key = next(iter(due))
            if due[key] > now:
                break
            del due[key]
            try:
                self._fire(key)
            except Exception:  # as the reactor does with a call that raises: the others still fire
                log.failure("a timer failed", Failure())
        self._call = None
        if due:
            self._call = self._clock.callLater(max(0.0, due[next(iter(due))] - self._clock.seconds()), self._expire)
        elif self._idle is not None:
            self._idle(self)


#: A lane's call while it fires its timers (those they set wait for the lane to re-arm).
_EXPIRING: Any = object()


#: Lanes a :class:`TimerLanes` keeps, empty, until their call comes; past these, a lane is let go
#: as soon as its last timer is cancelled.
IDLE_LANES = 4


class TimerLanes:
    """Timers of any delay on one clock, each key fired with ``fire(key)`` at its deadline: a
    :class:`TimerLane` per delay, while it holds a timer or its call is still to come. Delays a
    caller chooses (a play's timeout) make a lane each: while more than :data:`IDLE_LANES` are
    held, a lane whose last timer is cancelled is let go at once, with its call, so distinct
    delays cost no more than a call of the clock each would, and nothing once their timers are
    gone (the few lanes kept, no later than their delay)."""

    __slots__ = ("_clock", "_fire", "_lanes")

    def __init__(self, clock: IReactorTime, fire: Callable[[Any], object]) -> None:
        self._clock = clock
        self._fire = fire
        self._lanes: dict[float, TimerLane] = {}

    def __len__(self) -> int:
        """The lanes held now (as many as the distinct delays of the timers set)."""
        return len(self._lanes)

    def set(self, delay: float, key: Hashable) -> None:
        """Fire ``key`` ``delay`` seconds from now. A key is set in one lane at a time: set it
        again with another delay only once it fired or was cancelled."""
        lane = self._lanes.get(delay)
        if lane is None:
            lane = self._lanes[delay] = TimerLane(self._clock, delay, self._fire, self._idle)
        lane.set(key)

    def cancel(self, delay: float, key: Hashable) -> None:
        """Never fire ``key``, set with ``delay`` (if it is set)."""
        lane = self._lanes.get(delay)
        if lane is not None:
            lane.cancel(key)
            if not lane and len(self._lanes) > IDLE_LANES:
                lane.stop()
                del self._lanes[delay]

    def _idle(self, lane: TimerLane) -> None:
        if self._lanes.get(lane.delay) is lane:  # not one let go already, nor one made since
            del self._lanes[lane.delay]  # its call came and found nothing: it arms none
