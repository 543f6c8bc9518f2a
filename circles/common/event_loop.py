"""The epoll reactor's loop, each ready descriptor served by a direct call.

Twisted's ``EPollReactor.doPoll`` serves every ready descriptor through
``twisted.python.log.callWithLogger``: it asks the descriptor for its ``logPrefix()`` and pushes a
log context around the call (two dict copies, a thread-local lookup, a push and a pop), so that
an event logged through the legacy ``twisted.python.log`` during the call (Twisted's traceback of
an exception out of ``doRead``, say) names the connection in its ``system``. About 1.5 us an
event, paid by every read of every connection for events that almost never happen: without it
the server executes 14% fewer instructions a ``whoami`` and 6% fewer a ``play``
(docs/benchmarks.md, "The reactor's loop").

:func:`serve_events_directly` gives a reactor the same loop with a direct call. The ``system``
is kept, read only when a legacy event is logged: the root log context's ``system`` becomes the
log prefix of the descriptor being served (in the reactor's thread; ``-`` elsewhere and between
events, as before). For a process of its own only (``twistd``'s plugins): it changes Twisted's
root log context, which an embedding application owns.

The direct loop also ends each turn itself: :class:`TurnEnd` is a clock whose ``callLater(0, f)``
runs ``f`` right after the poll's events are served, from a list, where the reactor's makes a
``DelayedCall`` and pushes it on the heap of timers, to be popped, checked and called by the next
``runUntilCurrent``. It is for work gathered over a turn and done once at its end: Twisted's TLS
transport writes a connection's records of a turn so (:func:`circles.server.tls.tls_factory`),
the server queues its plays, and the worker writes to its engine children and records its
results. Without the direct loop (an embedding application, another reactor) it is the
reactor's ``callLater``.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python import context, log
from zope.interface import implementer

#: What the root context's ``system`` is outside of any descriptor's call, as Twisted sets it.
NO_SYSTEM = "-"


def _prefix(selectable: Any) -> str:
    """``selectable``'s log prefix, as ``callWithLogger`` reads it (which also logs the exception
    of a ``logPrefix`` that raises, before every call of the descriptor: here it is not logged)."""
    try:
        return selectable.logPrefix()
    except KeyboardInterrupt:
        raise
    except BaseException:
        return "(buggy logPrefix method)"


class DirectPoll:
    """``EPollReactor.doPoll``, calling ``_doReadOrWrite`` itself for each ready descriptor."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.thread = threading.get_ident()
        self.serving: Any = None  # the descriptor whose event is being served, or None
        self.turn_end: list[TurnEndCall] = []  # run after the events being served

    def poll(self, timeout: float | None) -> None:
        """One wait for events (at most ``timeout`` seconds, None: as long as it takes), each
        event served, then the calls for the end of the turn; an exception out of one is logged as
        ``callWithLogger`` (or ``runUntilCurrent``) logs it and the others are still served."""
        reactor = self._reactor
        if self.turn_end:
            # Asked for outside the events (by a timer, a thread's call): run before waiting, and
            # do not wait, as the timeout counted none of what they may have set off.
            self.end_turn()
            timeout = 0
        selectables = reactor._selectables
        try:
            ready = reactor._poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        serve = reactor._doReadOrWrite
        try:
            for fd, event in ready:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                self.serving = selectable
                try:
                    serve(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    log.err(system=_prefix(selectable))
        finally:
            self.serving = None
        if self.turn_end:
            self.end_turn()

    def end_turn(self) -> None:
        """The calls asked for the end of this turn (those they ask for run at the next one's)."""
        calls, self.turn_end = self.turn_end, []
        for call in calls:
            function = call.function
            if function is None:
                continue  # cancelled
            call.function = None
            call.called = True
            try:
                function(*call.args, **call.kw)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(None, "while handling a call at the end of a turn")


@implementer(IDelayedCall)
class TurnEndCall:
    """A call for the end of a turn (:class:`TurnEnd`): what ``callLater(0)`` returns."""

    __slots__ = ("function", "args", "kw", "called", "_time")

    def __init__(self, function: Callable[..., object], args: tuple, kw: dict, time: float) -> None:
        self.function: Callable[..., object] | None = function
        self.args, self.kw, self._time = args, kw, time
        self.called = False

    def getTime(self) -> float:
        return self._time

    def active(self) -> bool:
        return self.function is not None

    def cancel(self) -> None:
        if self.function is None:
            raise AlreadyCalled() if self.called else AlreadyCancelled()
        self.function, self.args, self.kw = None, (), {}

    def delay(self, secondsLater: float) -> None:
        raise NotImplementedError("a call at the end of the turn is not moved")

    def reset(self, secondsFromNow: float) -> None:
        raise NotImplementedError("a call at the end of the turn is not moved")


@implementer(IReactorTime)
class TurnEnd:
    """``reactor``'s clock, whose ``callLater(0, f)`` runs ``f`` at the end of the direct loop's
    turn (after the events being served, or before the next wait when asked for outside them)
    instead of by the timers' next run; the reactor's own ``callLater`` for another delay, or
    for a reactor without the direct loop."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def seconds(self) -> float:
        return self._reactor.seconds()

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return self._reactor.getDelayedCalls()

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall:
        loop = getattr(getattr(self._reactor, "doIteration", None), "__self__", None)  # none on a test's Clock
        if delay != 0 or not isinstance(loop, DirectPoll):
            return self._reactor.callLater(delay, callable, *args, **kw)
        call = TurnEndCall(callable, args, kw, self._reactor.seconds())
        loop.turn_end.append(call)
        return call


class _ServedSystem(dict):
    """The root log context of legacy events (``ILogContext``): a copy of it, which is what every
    legacy event starts from, has the served descriptor's log prefix as its ``system``."""

    def __init__(self, loop: DirectPoll) -> None:
        super().__init__(system=NO_SYSTEM)
        self._loop = loop

    def copy(self) -> dict:
        copied = dict(self)
        serving = self._loop.serving
        if serving is not None and threading.get_ident() == self._loop.thread:
            copied["system"] = _prefix(serving)
        return copied


def serve_events_directly(reactor: Any) -> bool:
    """Give ``reactor`` (Twisted's epoll reactor, and only it: another is left as it is) the
    direct loop; call it in the thread that runs the reactor. True if it was given."""
    from twisted.internet.epollreactor import EPollReactor

    if type(reactor) is not EPollReactor:
        return False
    loop = DirectPoll(reactor)
    reactor.doIteration = loop.poll  # type: ignore[method-assign]  # the instance, not the class
    context.setDefault(log.ILogContext, _ServedSystem(loop))
    return True
