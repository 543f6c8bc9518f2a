"""Logging what clients get wrong without letting them write the log.

A failed ``authenticate`` or a refused upgrade is worth an info line, but a client can make
them as fast as the rate limit allows: one test wrote 26,133 lines (5.4 MB) from six
connections. So each is logged the first few times, then counted, and the count is written
once: at the connection's close (:class:`ConnectionAnomalies`), or at the end of a window timed
by the injected reactor (:class:`Refusals`, for upgrades refused before any connection exists).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from .logs import Logger

log = Logger()


class ConnectionAnomalies:
    """One connection's anomalies: the first ``shown`` logged at info, the rest summed up by
    :meth:`closed` in one line. ``kind`` names come from the code, never from the client."""

    def __init__(self, connection_id: Optional[int], shown: int = 3) -> None:
        self._conn = connection_id
        self._shown = shown
        self._unlogged: dict = {}  # kind -> count, past the first ``shown``
        self.count = 0

    def note(self, kind: str, format: str, **fields: Any) -> None:
        """Log ``format`` (with ``conn`` added) while under the budget, else count it."""
        self.count += 1
        if self.count <= self._shown:
            log.info(format, conn=self._conn, anomaly=kind, **fields)
        else:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1

    def closed(self) -> None:
        """The summary line, if anything went unlogged."""
        if self._unlogged:
            log.info("connection {conn}: {unlogged} more anomalies not logged one by one: {kinds}",
                     conn=self._conn, unlogged=self.count - self._shown, kinds=dict(self._unlogged))


class Refusals:
    """Refused WebSocket upgrades, process-wide: the first ``shown`` of each ``window`` seconds
    logged at info, the rest counted by status and by address (the ``top`` busiest named) and
    summed up in one line when the window ends."""

    def __init__(self, clock: IReactorTime, window: float = 60.0, shown: int = 10, top: int = 5) -> None:
        self._clock = clock
        self._window = window
        self._shown = shown
        self._top = top
        self._logged = 0
        self._by_status: dict = {}
        self._by_peer: dict = {}
        self._timer: Optional[IDelayedCall] = None

    def note(self, peer: str, status: int, reason: str) -> None:
        if self._timer is None:
            self._timer = self._clock.callLater(self._window, self._flush)
        if self._logged < self._shown:
            self._logged += 1
            log.info("refused a WebSocket upgrade from {peer}: {status} {reason}", peer=peer, status=status,
                     reason=reason)
            return
        self._by_status[status] = self._by_status.get(status, 0) + 1
        # Addresses are the client's choice (IPv6 gives it plenty): only so many are kept.
        if peer in self._by_peer or len(self._by_peer) < 4 * self._top:
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1

    def _flush(self) -> None:
        self._timer = None
        if self._by_status:
            busiest = sorted(self._by_peer.items(), key=lambda item: -item[1])[:self._top]
            log.info("refused {unlogged} more WebSocket upgrades in {window}s, not logged one by one: "
                     "by status {by_status}; busiest addresses {busiest}",
                     unlogged=sum(self._by_status.values()), window=self._window, by_status=dict(self._by_status),
                     busiest=dict(busiest))
        self._logged = 0
        self._by_status.clear()
        self._by_peer.clear()

    def stop(self) -> None:
        """Write what is pending and cancel the timer (the service is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._flush()
