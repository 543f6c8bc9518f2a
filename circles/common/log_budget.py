"""Logging what clients get wrong without letting them write the log.

A failed ``authenticate`` or a refused upgrade is worth an info line, but a client can make
them as fast as the rate limit allows: one test wrote 26,133 lines (5.4 MB) from six
connections. So each connection logs its first few (:class:`ConnectionAnomalies`) and sums up
the rest in one line when it closes, and all of them together, whatever the number of
connections or addresses, go through a :class:`LogBudget`: so many lines a minute, then one
summary line at the minute's end, timed by the injected reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel

from circles.common.logs import Logger

log = Logger()


class LogBudget:
    """At most ``shown`` info lines per ``window`` seconds about ``subject``, process-wide.

    Past that, events are counted by kind and by peer address (the ``top`` busiest are named;
    addresses are the client's choice, so only so many are kept) and summed up in one line
    when the window ends. Kinds come from the code, never from the client. ``level`` is the
    level of the lines shown (the summary is info); ``peers`` names what ``peer`` is in it;
    ``logger`` is the caller's (its namespace names who logs), by default this module's.
    """

    def __init__(self, clock: IReactorTime, subject: str, shown: int, window: float = 60.0, top: int = 5, *,
                 level: LogLevel = LogLevel.info, peers: str = "addresses", logger: Logger | None = None) -> None:
        self._clock = clock
        self._log = log if logger is None else logger
        self._level = level
        self._peers = peers
        self._subject = subject
        self._shown = shown
        self._window = window
        self._top = top
        self._logged = 0
        self._by_kind: dict = {}
        self._by_peer: dict = {}
        self._timer: IDelayedCall | None = None

    def note(self, peer: str | None, kind: str, format: str, **fields: Any) -> None:
        """Log ``format`` with ``fields`` while the window's budget lasts, else count it."""
        if self._timer is None:
            self._timer = self._clock.callLater(self._window, self._flush)
        if self._logged < self._shown:
            self._logged += 1
            self._log.emit(self._level, format, peer=peer, anomaly=kind, **fields)
            return
        self._by_kind[kind] = self._by_kind.get(kind, 0) + 1
        if peer in self._by_peer or len(self._by_peer) < 4 * self._top:
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1

    def _flush(self) -> None:
        self._timer = None
        if self._by_kind:
            busiest = sorted(self._by_peer.items(), key=lambda item: -item[1])[:self._top]
            self._log.info("{subject}: {unlogged} more in {window}s not logged one by one: by kind {by_kind}; "
                           "busiest {peers} {busiest}", subject=self._subject, peers=self._peers,
                           unlogged=sum(self._by_kind.values()), window=self._window, by_kind=dict(self._by_kind),
                           busiest=dict(busiest))
        self._logged = 0
        self._by_kind.clear()
        self._by_peer.clear()

    def stop(self) -> None:
        """Write what is pending and cancel the timer (the service is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._flush()


class ConnectionAnomalies:
    """One connection's anomalies: the first ``shown`` logged (through the process-wide
    ``budget``), the rest counted and summed up by :meth:`closed` in one line."""

    __slots__ = ("_conn", "_peer", "_budget", "_shown", "_unlogged", "count")

    def __init__(self, connection_id: int | None, peer: str | None, budget: LogBudget, shown: int = 3) -> None:
        self._conn = connection_id
        self._peer = peer
        self._budget = budget
        self._shown = shown
        self._unlogged: dict | None = None  # kind -> count, past the first ``shown`` (made at the first)
        self.count = 0

    def note(self, kind: str, format: str, **fields: Any) -> None:
        """Log ``format`` (``conn`` and ``peer`` added) while under the budgets, else count it."""
        self.count += 1
        if self.count <= self._shown:
            self._budget.note(self._peer, kind, format, conn=self._conn, **fields)
        else:
            if self._unlogged is None:
                self._unlogged = {}
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1

    def closed(self) -> None:
        """The summary line, if anything went unlogged."""
        if self._unlogged:
            self._budget.note(self._peer, "connection summary",
                              "connection {conn}: {unlogged} more anomalies not logged one by one: {kinds}",
                              conn=self._conn, unlogged=self.count - self._shown, kinds=dict(self._unlogged))
