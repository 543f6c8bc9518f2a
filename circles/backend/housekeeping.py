"""What a server does about the workers beyond its own plays, every
:data:`~circles.backend.tasks.HEARTBEAT_INTERVAL` seconds (:class:`Housekeeping`): it reaps the
workers whose heartbeat lapsed (as workers do: a server alone still answers the plays of a dead
worker and re-queues its webhook tasks), and reads the live workers and queue length of the
circles it serves and the dead-letter list's length (for ``/metrics``, and for its watchers: a
server's init scripts wait there for their circle's first worker)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from txredisapi import RedisError

from circles.backend import tasks
from circles.backend.admin import reap
from circles.backend.scripts import BackendUnavailable
from circles.common.logs import Logger

log = Logger()


class Housekeeping:
    """One round every heartbeat interval, one round at a time; Redis trouble waits for the next.

    :param commands: the runner's command connection now (a txredisapi factory), or None.
    :param command: runs a Redis command there (a Deferred; Redis trouble fails it with
        :class:`BackendUnavailable`).
    :param connected: whether the runner's Redis is usable now.
    :param circles: the circles whose live workers and queue lengths are read; empty: none.

    :attr:`watchers` are called with :attr:`circle_stats` after each round that read them.
    """

    def __init__(self, clock: IReactorTime, prefix: str, commands: Callable[[], Any | None],
                 command: Callable[..., Deferred], connected: Callable[[], bool], circles=frozenset()) -> None:
        self.clock = clock
        self.prefix = prefix
        self._commands = commands
        self._command = command
        self._connected = connected
        self.circles = sorted(circles)
        self.circle_stats: dict[str, tuple[int, int]] = {}  # circle -> (live workers, queue length)
        self.dead_letters: int | None = None  # the dead-letter list's length, as last read
        self.reaped = 0  # dead workers reaped by this server
        self.watchers: list[Callable[[dict[str, tuple[int, int]]], None]] = []
        self._looping: LoopingCall | None = None
        self._running = False  # a round is in flight

    def start(self) -> None:
        self._looping = LoopingCall(self._round)
        self._looping.clock = self.clock
        self._looping.start(tasks.HEARTBEAT_INTERVAL, now=False)

    def stop(self) -> None:
        if self._looping is not None and self._looping.running:
            self._looping.stop()

    def _round(self) -> None:
        """Reap the workers whose heartbeat lapsed, and read the served circles' live workers and
        queue lengths (for ``/metrics``). One round at a time; Redis trouble waits for the next."""
        if self._running or not self._connected():
            return
        self._running = True
        ensureDeferred(self._one_round())

    async def _one_round(self) -> None:
        try:
            commands = self._commands()
            if commands is None:
                return
            await reap(commands.handler, self.prefix, counter=self)
            if self._commands() is None:
                return
            counts = await self.stats(self.circles)
            self.dead_letters, self.circle_stats = counts
            for watcher in self.watchers:
                watcher(self.circle_stats)
        except (RedisError, BackendUnavailable, CancelledError):
            pass  # Redis trouble: the next round tries again
        except Exception:
            log.failure("reaping workers")
        finally:
            self._running = False

    async def stats(self, circles) -> tuple[int, dict[str, tuple[int, int]]]:
        """``(dead letters, {circle: (live workers, queue length)})`` for ``circles``, in one step."""
        keys = [tasks.dead_key(self.prefix)]
        for circle in circles:
            keys += [tasks.circle_workers_key(self.prefix, circle), tasks.queue_key(self.prefix, circle)]
        counts = [int(n) for n in await self._command("eval", tasks.STATS, keys, [])]
        return counts[0], {circle: (counts[1 + 2 * i], counts[2 + 2 * i]) for i, circle in enumerate(circles)}
