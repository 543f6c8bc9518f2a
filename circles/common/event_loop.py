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
"""

from __future__ import annotations

import errno
import threading
from typing import Any

from twisted.python import context, log

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

    def poll(self, timeout: float | None) -> None:
        """One wait for events (at most ``timeout`` seconds, None: as long as it takes) and each
        event served; an exception out of one is logged as ``callWithLogger`` logs it and the
        others are still served."""
        reactor = self._reactor
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
