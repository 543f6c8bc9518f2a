"""Where jobs live: one interface, :class:`IJobStore`, and two stores with it.

* :class:`MemoryJobStore`, here: in this process's memory, expiring by the injected clock; what a
  server embedded with a script backend of its own (no Redis) uses.
* :class:`~circles.server.jobs.redis_store.RedisJobStore`: in Redis, where every process of a
  ``--processes`` server, and every server sharing the Redis, sees them; what a server with Redis
  uses.

A store keeps, per caller, a table of jobs (:class:`~circles.server.jobs.model.Job`) with a
version, and per job its script and output beside it (read one at a time: a table is read whole
at each change, and must stay small). A change (:class:`~circles.server.jobs.model.Change`) is
written all or nothing, and only onto the version it was computed from; it also keeps the count
of every caller's live jobs within the server's bound (``--max-jobs``).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from circles.server.jobs.model import Change, Job, TooManyJobs


class IJobStore(Interface):
    """A caller's table of jobs, read whole and written by versioned changes; every method
    returns a Deferred, failing with :class:`~circles.backend.scripts.BackendUnavailable` when
    the store cannot be reached (its ``BackendFull`` when Redis is at its maxmemory)."""

    def load(caller: str) -> Deferred:
        """Fire with (version, {job id: Job}): ``caller``'s table as it is (expired jobs included:
        :class:`~circles.server.jobs.model.Table` leaves them out)."""

    def save(caller: str, version: int, change: Change, now: float, ttl: float, most: int) -> Deferred:
        """Write ``change`` to ``caller``'s table if it is still at ``version``: fire with True;
        False (nothing written) if another change came first. Fails with
        :class:`~circles.server.jobs.model.TooManyJobs` (nothing written) when the jobs it creates
        would make every caller's live jobs more than ``most`` (0: no bound). ``now`` and ``ttl``:
        the table lives ``ttl`` seconds from its last change."""

    def read(job_id: str, field: str) -> Deferred:
        """Fire with a job's ``script`` or ``output`` (None: none, or no such job)."""


@implementer(IJobStore)
class MemoryJobStore:
    """Jobs in this process's memory (a server without Redis): the same behaviour as in Redis,
    expiring by ``clock``."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._tables: dict[str, tuple[int, float, dict[str, Job]]] = {}  # caller -> (version, expires, jobs)
        self._data: dict[str, tuple[float, dict[str, str]]] = {}  # job id -> (expires, fields)
        self._live: dict[str, float] = {}  # every live job's id -> when it expires

    def load(self, caller: str) -> Deferred:
        version, expires, jobs = self._tables.get(caller, (0, 0.0, {}))
        if expires <= self._clock.seconds():
            version, jobs = 0, {}
        return succeed((version, dict(jobs)))

    def save(self, caller: str, version: int, change: Change, now: float, ttl: float, most: int) -> Deferred:
        current, expires, jobs = self._tables.get(caller, (0, 0.0, {}))
        if expires <= self._clock.seconds():
            current, jobs = 0, {}
        if current != version:
            return succeed(False)
        self._sweep()
        if change.created and most and len(self._live) + len(change.created) > most:
            return fail(TooManyJobs(most, "server"))
        jobs = dict(jobs)
        for job_id in change.removed:
            jobs.pop(job_id, None)
            self._data.pop(job_id, None)
            self._live.pop(job_id, None)
        for job in change.created:
            self._live[job.id] = job.expires_at
        for job in change.put:
            jobs[job.id] = job
        for job_id, fields in change.data.items():
            self._data.setdefault(job_id, (jobs[job_id].expires_at, {}))[1].update(fields)
        self._tables[caller] = (version + 1, now + ttl, jobs)
        return succeed(True)

    def _sweep(self) -> None:
        """Forget what has expired (each change pays for it: the store holds live jobs only)."""
        now = self._clock.seconds()
        self._live = {job_id: until for job_id, until in self._live.items() if until > now}
        self._data = {job_id: entry for job_id, entry in self._data.items() if entry[0] > now}
        self._tables = {caller: entry for caller, entry in self._tables.items() if entry[1] > now}

    def read(self, job_id: str, field: str) -> Deferred:
        expires, fields = self._data.get(job_id, (0.0, {}))
        if expires <= self._clock.seconds():
            return succeed(None)
        return succeed(fields.get(field))

    def live(self) -> int:
        """Every caller's live jobs (for tests)."""
        now = self._clock.seconds()
        return sum(1 for until in self._live.values() if until > now)
