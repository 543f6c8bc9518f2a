"""What one connection has written and its peer has not read yet, and the bound on it.

A client that stops reading leaves our replies in the server's memory. For replies to its own
requests, backpressure is enough: while the transport's send buffer is full, the connection's
requests are not read, nor are the frames a read already brought processed, so it stalls
itself. Play replies are different: they come from Redis whether or not the client reads, and
a client may have :attr:`~circles.server.config.Config.max_plays` of them on their way. So:

* a late reply (one a method answers later: a play's) that would take what the connection has
  unread past ``limit`` is not sent: the request is answered -32007 instead (``data``:
  ``{size, unread, limit}``), by the JSON-RPC dispatcher (:meth:`Backlog.left`, :meth:`Backlog.refuse`);
* a connection that has had to be refused so (or is past ``limit`` anyway) and does not drain
  within ``timeout`` seconds is given up: ``stuck`` is called.

What is unread is counted without reading the transport's private buffers, so it means the
same over TCP and TLS (whose ``TLSMemoryBIOProtocol`` passes its TCP transport's pauses on):
Twisted pauses a streaming producer once its send buffer holds more than ``bufferSize`` (64 KiB)
and resumes it once everything is sent. Every byte written between the two is counted, the
write that filled the buffer included; so the count is what the server holds for the peer
beyond the transport's own 64 KiB (and it only errs high: what the kernel takes meanwhile is
not subtracted until the buffer is empty).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer

from circles.common.jsonrpc import RPCError
from circles.common.wire import REPLY_TOO_LARGE


class BacklogOwner(Protocol):
    """What a :class:`Backlog` tells: its connection."""

    def backlog_drained(self) -> None:
        """The transport has sent everything (the connection processes the frames it held back)."""

    def backlog_stuck(self, unread: int) -> None:
        """The transport has not sent everything within the backlog's timeout of going over its limit."""


@implementer(IPushProducer)
class Backlog:
    """The producer of what a connection writes, registered with its transport: paused while the
    peer does not read (its requests are not read either), counting what is written meanwhile.

    ``owner.backlog_drained()`` is called when the transport has sent everything (the connection
    processes the frames it held back); ``owner.backlog_stuck(unread)`` when it has not within
    ``timeout`` seconds (0: never) of going over ``limit``. (One per connection, idle ones
    included: its state is in slots.)
    """

    __slots__ = ("_transport", "_clock", "limit", "_timeout", "_owner", "paused", "unread", "_deadline")

    def __init__(self, owner: BacklogOwner, transport: Any, clock: IReactorTime, limit: int, timeout: float) -> None:
        self._owner: BacklogOwner | None = owner
        self._transport = transport
        self._clock = clock
        self.limit = limit
        self._timeout = timeout
        self.paused = False  # the transport's send buffer is full
        self.unread = 0  # bytes written since it filled (the one that filled it included)
        self._deadline: IDelayedCall | None = None

    def wrote(self, size: int) -> None:
        """``size`` bytes were just handed to the transport."""
        if self.paused:
            self.unread += size
            if self.unread > self.limit:
                self._start_deadline()

    def left(self) -> int | None:
        """Bytes a late reply may take now; None while the peer keeps up (any reply may go)."""
        return self.limit - self.unread if self.paused else None

    def refuse(self, size: int) -> RPCError:
        """The error that answers a late reply of ``size`` bytes instead of it: one that does not
        fit in :meth:`left`. The connection is over its bound from now: it must drain in time."""
        self._start_deadline()
        return RPCError(REPLY_TOO_LARGE, f"Reply not sent: {self.unread} bytes of earlier replies to this connection "
                        f"are still unread", {"size": size, "unread": self.unread, "limit": self.limit})

    def stop(self) -> None:
        """The connection is gone: forget the timer and the owner (and the cycle through them)."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = self._owner = None

    def _start_deadline(self) -> None:
        if self._deadline is None and self._timeout and self._owner is not None:
            self._deadline = self._clock.callLater(self._timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self.paused and self._owner is not None:
            self._owner.backlog_stuck(self.unread)

    # IPushProducer: what the transport calls.

    def pauseProducing(self) -> None:
        if not self.paused:  # TCP calls it again at each write while the buffer is full
            self.paused = True
            self.unread = 0  # the write under way is counted as it returns (wrote)
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.unread = 0
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        self._transport.resumeProducing()
        if self._owner is not None:
            self._owner.backlog_drained()

    def stopProducing(self) -> None:
        self.stop()
