"""``GroupWait``: one Redis ``WAIT`` at a time covers every write sent before it (group commit).

Why: ``WAIT numreplicas timeout`` blocks the connection it is sent on until that many replicas
acknowledge every write *that connection* sent before it. One WAIT per webhook event, each on a
connection taken for the purpose, serialises the waits: 16 concurrent events with a replica
that took a second to acknowledge were answered over 8 s on two connections, and the last ones
got 503. Yet a WAIT acknowledges everything written before it on its connection, so events can
share one.

How: the writes of every event that must reach replicas go on one connection, pipelined (sent
at once, never waiting for each other). After its last write is sent, an event asks
:meth:`GroupWait.after_writes` for the WAIT that covers it. If no WAIT is in flight on that
connection, one is sent at once; otherwise the event joins the group that the next WAIT will
cover, sent as soon as the one in flight is answered. So whatever the load there is at most one
WAIT in flight, each answers every event whose writes went out before it, and an event waits at
most for the rest of the WAIT in flight and then its own: twice the timeout at the very worst
(a write that depends on an earlier one's answer, as a redelivery's rewrite of its seen key,
joins a WAIT after that answer: one more).
(Redis runs a connection's commands in order, so writes sent while a WAIT blocks the connection
wait in Redis's buffer for it, then run, then the next WAIT covers them.)

A WAIT that fails (the connection lost or timed out, an error reply) fails every event it
covers, and the events waiting for the next one when the connection is gone fail too: none is
answered as held by replicas unless a WAIT on the connection that carried its writes said so.
A new connection starts a group of its own.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from txredisapi import ConnectionError as RedisConnectionError

from circles.common.logs import Logger

log = Logger()


class _Connection:
    """The groups of one connection: the events its WAIT in flight covers, and those waiting
    for the next WAIT."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.covered: list[Deferred] | None = None  # the WAIT in flight covers these; None: no WAIT in flight
        self.next: list[Deferred] = []  # their writes went out after it: the next WAIT's


class GroupWait:
    """WAITs for ``replicas`` replicas, ``timeout`` seconds each, shared by every write before them.

    :param replicas: the replicas a WAIT asks for (``WAIT``'s ``numreplicas``).
    :param timeout: seconds a WAIT may block (``WAIT``'s timeout, rounded to a millisecond, at least one).
    """

    def __init__(self, replicas: int, timeout: float) -> None:
        self.replicas = replicas
        self.timeout_ms = max(1, round(timeout * 1000))
        self._current: _Connection | None = None

    def after_writes(self, connection: Any) -> Deferred:
        """A Deferred firing with how many replicas acknowledged every write sent so far on
        ``connection`` (a txredisapi protocol: WAIT's own answer, possibly fewer than asked
        for, when its timeout passed first); failing with the WAIT's failure (a RedisError)."""
        current = self._current
        if current is None or current.connection is not connection:
            # A new connection (the old one was lost): its writes start a group of their own;
            # the old connection's WAIT, if any, answers only what went out on it.
            current = self._current = _Connection(connection)
        event: Deferred = Deferred()
        current.next.append(event)
        if current.covered is None:
            self._send(current)
        return event

    def _send(self, group: _Connection) -> None:
        group.covered, group.next = group.next, []
        try:
            d = group.connection.execute_command("WAIT", self.replicas, self.timeout_ms)
        except Exception:  # not connected any more (txredisapi raises): fails the group at once
            d = fail()
        d.addBoth(self._answered, group)

    def _answered(self, result: Any, group: _Connection) -> None:
        covered, group.covered = group.covered or [], None
        if group.next:
            if isinstance(result, Failure) or not group.connection.connected:
                # The writes of the next group went out on a connection now broken (a reply
                # timeout aborts it): no WAIT can say where they are.
                waiting, group.next = group.next, []
                lost = result if isinstance(result, Failure) else Failure(RedisConnectionError("Lost connection"))
                for event in waiting:
                    event.errback(lost)
            else:
                self._send(group)
        log.debug("WAIT for {replicas} replica(s) answered {events} event(s): {result}", replicas=self.replicas,
                  events=len(covered), result=result.getErrorMessage() if isinstance(result, Failure) else result)
        for event in covered:
            if isinstance(result, Failure):
                event.errback(result)
            else:
                event.callback(int(result))
