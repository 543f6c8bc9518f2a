"""Webhook events held by Redis replicas before they are answered (``ack_replicas``):
:class:`ReplicaAcks` writes each event and waits for the ``WAIT`` that covers it.

Concurrent events share their waits (group commit, :mod:`circles.backend.group_wait`): their
writes go, pipelined, on one connection of their own (WAIT blocks the connection it is sent on,
so never the command connection), and one WAIT at a time is in flight there, covering every
write sent before it; the events written while it blocks are covered by the next one. A WAIT
that says fewer replicas than asked, or a write connection lost before its WAIT is answered,
fails every event it covers (503: the provider retries, and its retry is a duplicate if the
first delivery reached the primary). While the primary has fewer replicas connected than asked,
events fail at once: an event only the primary holds could vanish with it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from txredisapi import InvalidData, RedisError

from circles.backend import tasks
from circles.backend.group_wait import GroupWait
from circles.backend.health import FULL, is_oom
from circles.backend.scripts import BackendFull, BackendUnavailable
from circles.backend.txredisapi_patches import live_connection
from circles.backend.values import text

#: Webhook events written and waiting for replicas to acknowledge them (their WAIT), beyond
#: which they are refused at once: what the write connection holds is bounded by this many bodies.
MAX_ACK_WAITING = 64


class ReplicaAcks:
    """Writes that succeed once ``replicas`` replicas hold them, within ``timeout`` seconds.

    :param connection: the write connection now (a txredisapi factory of its own), or None.
    :param replicas_connected: the replicas the primary has, as the health loop last saw; None: unknown.
    :param filled: called when Redis refuses a write at its maxmemory.
    """

    def __init__(self, replicas: int, timeout: float, connection: Callable[[], object | None],
                 replicas_connected: Callable[[], int | None], filled: Callable[[], None]) -> None:
        self.replicas = replicas
        self.timeout = timeout
        self._connection = connection
        self._replicas_connected = replicas_connected
        self._filled = filled
        self.waiting = 0  # events written there, or being written, not yet acknowledged
        self._group_wait = GroupWait(replicas, timeout)  # one WAIT in flight covers them all

    async def enqueue_once(self, keys: list, args: list, script: str = tasks.ENQUEUE_ONCE) -> list:
        """ENQUEUE_ONCE (or ``script``, a step of its keys and answers) on the write connection, then wait for the ``WAIT`` that covers it to say
        :attr:`replicas` replicas hold it (:class:`~circles.backend.group_wait.GroupWait`:
        one WAIT covers every event written before it). A duplicate rewrites its seen key as it
        is, so that the WAIT covers the first delivery too: its 503 may have come from a replica
        that had not caught up.

        Every command here is sent at once, as one command (``EVAL``, never txredisapi's
        EVALSHA-then-EVAL, whose second try would go out after a WAIT that the event counts on)."""
        connected = self._replicas_connected()
        if connected is not None and connected < self.replicas:
            raise BackendUnavailable(f"the Redis primary has {connected} replica(s) connected, "
                                     f"{self.replicas} must hold each webhook event")
        factory = self._connection()
        connection = live_connection(factory) if factory is not None else None
        if connection is None:
            raise BackendUnavailable("Redis is unreachable")
        if self.waiting >= MAX_ACK_WAITING:
            raise BackendUnavailable("too many webhook events waiting for Redis replicas")
        self.waiting += 1
        covering: list[Deferred] = []  # the WAITs asked for; only the last one's answer counts
        try:
            written = connection.execute_command("EVAL", script, len(keys), *keys, *args)
            covering.append(self._group_wait.after_writes(connection))
            result = await written
            if not int(result[0]):
                rewritten = connection.execute_command("SET", keys[0], text(result[1]), "XX", "KEEPTTL")
                covering.append(self._group_wait.after_writes(connection))
                await rewritten
            acknowledged = int(await covering[-1])
        except InvalidData:
            raise ValueError("a task field is not valid UTF-8 text") from None
        except RedisError as e:
            if is_oom(str(e)):
                self._filled()
                raise BackendFull(FULL) from None
            raise BackendUnavailable(f"Redis error: {e}") from None
        finally:
            self.waiting -= 1
            for wait in covering:
                wait.addErrback(lambda _: None)  # an answer no longer awaited (a failed write's)
        if acknowledged < self.replicas:
            raise BackendUnavailable(f"{acknowledged} of {self.replicas} Redis replica(s) acknowledged the "
                                     f"webhook event within {self.timeout}s")
        return result
