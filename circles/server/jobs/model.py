"""What a job is, and the rules of jobs, as pure functions over one caller's table of jobs.

A caller's jobs are one :class:`Table`, read whole and written back all or nothing by a store
(:mod:`circles.server.jobs.store`): a change computed on a table that another process changed
meanwhile is not written, and is computed again on the new table. A change is one operation
(:func:`create`, :func:`start`, :func:`stop`, :func:`delete`, :func:`clear`, :func:`finish`, or
none: a look), then :func:`advance`, which applies what follows from the table as it now is:

1. a ``started`` job past its deadline (its timeout, plus :data:`LOST_GRACE`) was lost (the server
   process running it went away): it ends in ``error``;
2. a job not yet run (``created`` or ``dispatched``) whose prerequisite ended in ``error`` or was
   ``stopped``, or no longer exists (deleted, expired), ends in ``error`` naming it, at once;
3. a ``dispatched`` job whose prerequisites all ``finished`` is started, oldest first, while the
   caller has fewer than its bound of running jobs: the process that wrote the change runs it.

Jobs are taken in the order they were made (:attr:`Job.seq`), and a prerequisite is always
older than its dependents (it must exist when they are made, and a job's prerequisites never
change), so one pass settles a whole chain, and no cycle can ever form.

Statuses (hero's words, and ``stopped``):

=============  ====================================================================================
``created``    made by create_job, not asked to run
``dispatched`` start_job asked for it: it waits for its prerequisites to finish and for a running slot
``started``    handed to the circle's workers
``finished``   ran; its output is kept
``error``      the script failed, or timed out, or could not run (no worker, Redis, a prerequisite
               that failed, not a member), or its run was lost: ``error`` says which
``stopped``    stop_job stopped it (before or while it ran)
=============  ====================================================================================

Times are seconds (the injected clock's); jobs live ``ttl`` seconds from their creation, whatever
their status, and are gone after that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import attrs

from circles.common.ids import random_uuid

CREATED = "created"
DISPATCHED = "dispatched"
STARTED = "started"
FINISHED = "finished"
ERROR = "error"
STOPPED = "stopped"
STATUSES = (CREATED, DISPATCHED, STARTED, FINISHED, ERROR, STOPPED)
ENDED = frozenset({FINISHED, ERROR, STOPPED})
NOT_RUN = frozenset({CREATED, DISPATCHED})

#: The script types a job may have: our workers run Rhai (the name is taken in any case).
SCRIPT_TYPES = ("rhai",)
#: Prerequisites one job may name.
MAX_PREREQUISITES = 16
#: Characters of an error kept with its job (an error past that is cut, saying so).
MAX_ERROR = 4096
#: Seconds past a started job's timeout after which its run counts as lost (its server process
#: stopped before it could say how it ended).
LOST_GRACE = 60.0

# Why a job ended in error (:attr:`Job.why`): what the JSON-RPC error answering for it is.
FAILED = "failed"  # the worker ran the script and reported an error
TIMED_OUT = "timeout"  # no answer within its timeout
NO_WORKER = "no_worker"  # no live worker serves the circle
UNAVAILABLE = "unavailable"  # the script backend (Redis) could not take it
NOT_A_MEMBER = "not_a_member"  # the circle's policy no longer lets its caller play
PREREQUISITE = "prerequisite"  # a prerequisite failed, was stopped, or is gone
LOST = "lost"  # its run was lost (see LOST_GRACE), or the server stopped while it ran
BY_CALLER = "stop_job"  # stopped by its caller

_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def new_job_id() -> str:
    """A job's id: a random UUID (version 4), as the server alone chooses them."""
    return random_uuid()


def is_job_id(value: object) -> bool:
    """Whether ``value`` has the form of the ids :func:`new_job_id` makes (lowercase canonical
    UUID v4): anything else names no job, and is refused without a look-up."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def cut(text: str, most: int = MAX_ERROR) -> str:
    """``text``, cut to ``most`` characters, saying so."""
    return text if len(text) <= most else text[:most] + f"... ({len(text) - most} more characters cut)"


class JobError(Exception):
    """Base of what an operation on a table refuses."""


class JobNotFound(JobError):
    """No job of this caller in this circle has that id (never made, another key's or circle's,
    deleted, expired: all alike, so that ids do not leak)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class PrerequisiteNotFound(JobNotFound):
    """A prerequisite named at creation is no job of this caller in this circle."""


class WrongState(JobError):
    """The job's status does not allow what was asked; ``why`` says so, for a person."""

    def __init__(self, job: Job, why: str) -> None:
        super().__init__(why)
        self.job = job
        self.why = why


class TooManyJobs(JobError):
    """Making one more job would pass a bound: ``limit`` jobs of the caller (``of`` "caller"), or
    of every caller (``of`` "server")."""

    def __init__(self, limit: int, of: str) -> None:
        super().__init__(limit, of)
        self.limit = limit
        self.of = of


def _ids(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen
class Job:
    """One job as its table keeps it (its script and output are kept beside it, by the store)."""

    id: str
    caller: str  # compressed hex key of the caller that made it: its owner
    circle: str  # compressed hex key of the circle it runs in (hero's context_id)
    script_type: str
    timeout: float  # seconds its run may take
    prerequisites: tuple[str, ...] = attrs.field(converter=_ids)
    seq: int  # its place in the order its caller's jobs were made
    created_at: float
    expires_at: float
    updated_at: float
    status: str = CREATED
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None  # why it ended in error, or was stopped
    why: str | None = None  # which kind of error (FAILED, TIMED_OUT, ...), or BY_CALLER

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


@attrs.frozen
class Outcome:
    """How a run ended, as the runner tells :func:`finish`."""

    status: str  # FINISHED, ERROR or STOPPED
    output: str = ""
    error: str | None = None
    why: str | None = None


@attrs.frozen
class Change:
    """What a change writes to its caller's table, as a store applies it: all of it or none."""

    put: tuple[Job, ...]  # jobs made or changed, as they are now
    removed: tuple[str, ...]  # ids of jobs deleted or expired (their scripts and outputs too)
    created: tuple[Job, ...]  # of ``put``, the jobs new in this change (counted against the server's bound)
    data: dict  # job id -> {field: text}: a new job's "script", an ended job's "output"


class Table:
    """One caller's jobs at ``now``, as read at ``version``, and what a change does to them (for
    its store to write).

    The jobs passed that have expired are left out, and removed by the change."""

    def __init__(self, jobs: dict[str, Job], now: float, version: int = 0) -> None:
        self.now = now
        #: The version of the table read; once the change is written, the version it wrote.
        self.version = version
        self.jobs = {job_id: job for job_id, job in jobs.items() if job.expires_at > now}
        self._new: set[str] = set()
        self._put: dict[str, Job] = {}
        self._removed: set[str] = set(jobs) - set(self.jobs)
        self._data: dict[str, dict] = {}
        #: Jobs that ended in this change, as they ended.
        self.ended: list[Job] = []
        #: Jobs this change started: the process that writes it runs them.
        self.claimed: list[Job] = []
        #: Jobs this change removed, as they were.
        self.dropped: list[Job] = []

    @property
    def changed(self) -> bool:
        return bool(self._put or self._removed)

    def change(self) -> Change:
        return Change(put=tuple(self._put.values()), removed=tuple(sorted(self._removed)),
                      created=tuple(self._put[job_id] for job_id in sorted(self._new)), data=self._data)

    def set(self, job: Job) -> Job:
        self.jobs[job.id] = job
        self._put[job.id] = job
        return job

    def write(self, job_id: str, **fields: str) -> None:
        self._data.setdefault(job_id, {}).update(fields)

    def add(self, job: Job) -> Job:
        self._new.add(job.id)
        return self.set(job)

    def remove(self, job: Job) -> None:
        del self.jobs[job.id]
        self._put.pop(job.id, None)
        self._data.pop(job.id, None)
        if job.id in self._new:
            self._new.discard(job.id)
        else:
            self._removed.add(job.id)
        self.dropped.append(job)

    def ordered(self, circle: str | None = None) -> list[Job]:
        """The jobs (of ``circle``, or all), oldest first."""
        return sorted((job for job in self.jobs.values() if circle is None or job.circle == circle),
                      key=lambda job: job.seq)

    def owned(self, circle: str, job_id: str) -> Job:
        """The job ``job_id`` of this caller in ``circle``, or :class:`JobNotFound`."""
        job = self.jobs.get(job_id)
        if job is None or job.circle != circle:
            raise JobNotFound(job_id)
        return job

    def dependents(self, job: Job) -> list[str]:
        """The ids of the jobs that name ``job`` as a prerequisite, oldest first."""
        return [other.id for other in self.ordered(job.circle) if job.id in other.prerequisites]

    def running(self) -> int:
        return sum(1 for job in self.jobs.values() if job.status == STARTED)


def _end(table: Table, job: Job, status: str, error: str | None = None, why: str | None = None,
         output: str | None = None) -> Job:
    ended = table.set(attrs.evolve(job, status=status, ended_at=table.now, updated_at=table.now,
                                   error=None if error is None else cut(error), why=why))
    if output:
        table.write(job.id, output=output)
    table.ended.append(ended)
    return ended


def create(table: Table, *, job_id: str, caller: str, circle: str, script: str, script_type: str,
           timeout: float, prerequisites: Iterable[str] = (), ttl: float, most: int = 0, start: bool = False) -> Job:
    """Make a job (``start``: asked to run at once, as start_job would); :class:`TooManyJobs` when
    the caller has ``most`` jobs already (0: no bound), :class:`PrerequisiteNotFound` for a
    prerequisite that is no job of the caller in ``circle``."""
    if most and len(table.jobs) >= most:
        raise TooManyJobs(most, "caller")
    named = tuple(dict.fromkeys(prerequisites))  # each once, in the order given
    for prerequisite in named:
        try:
            table.owned(circle, prerequisite)
        except JobNotFound:
            raise PrerequisiteNotFound(prerequisite) from None
    seq = max((job.seq for job in table.jobs.values()), default=0) + 1
    job = table.add(Job(id=job_id, caller=caller, circle=circle, script_type=script_type, timeout=timeout,
                        prerequisites=named, seq=seq, created_at=table.now, expires_at=table.now + ttl,
                        updated_at=table.now, status=DISPATCHED if start else CREATED))
    table.write(job_id, script=script)
    return job


def start(table: Table, circle: str, job_id: str) -> Job:
    """Ask a ``created`` job to run: it is ``dispatched``, and runs once it may (:func:`advance`)."""
    job = table.owned(circle, job_id)
    if job.status != CREATED:
        raise WrongState(job, f"start_job takes a created job, and this one is {job.status}")
    return table.set(attrs.evolve(job, status=DISPATCHED, updated_at=table.now))


def stop(table: Table, circle: str, job_id: str) -> Job:
    """Stop a job that has not ended: it is ``stopped`` (the runner stops its run if it is
    running); one that ended is :class:`WrongState`."""
    job = table.owned(circle, job_id)
    if job.status in ENDED:
        raise WrongState(job, f"the job has ended already: it is {job.status}")
    return _end(table, job, STOPPED, "stopped by its caller (stop_job)", BY_CALLER)


def delete(table: Table, circle: str, job_id: str) -> Job:
    """Remove a job whatever its status (the runner stops its run if it is running); its
    dependents that have not run end in error (:func:`advance`)."""
    job = table.owned(circle, job_id)
    table.remove(job)
    return job


def clear(table: Table, circle: str) -> list[Job]:
    """Remove every job of this caller in ``circle``."""
    jobs = table.ordered(circle)
    for job in jobs:
        table.remove(job)
    return jobs


def finish(table: Table, job_id: str, outcome: Outcome) -> Job | None:
    """Record how a run ended; None when the job is no longer ``started`` (stopped, deleted,
    expired or lost meanwhile): the outcome is then nobody's."""
    job = table.jobs.get(job_id)
    if job is None or job.status != STARTED:
        return None
    return _end(table, job, outcome.status, outcome.error, outcome.why, outcome.output)


def _blocked(table: Table, job: Job) -> str | None:
    """Why ``job`` can never run (a prerequisite that failed, was stopped or is gone), or None."""
    for prerequisite in job.prerequisites:
        other = table.jobs.get(prerequisite)
        if other is None:
            return f"prerequisite {prerequisite} no longer exists (deleted, or expired)"
        if other.status == ERROR:
            return f"prerequisite {prerequisite} failed: {other.error}"
        if other.status == STOPPED:
            return f"prerequisite {prerequisite} was stopped"
    return None


def advance(table: Table, most_running: int = 0, claiming: bool = True, lost_grace: float = LOST_GRACE) -> None:
    """Apply what follows from the table as it is (the module's docstring says what, in order):
    lost runs end, jobs whose prerequisites cannot finish end, and ``dispatched`` jobs that may run
    are started while the caller runs fewer than ``most_running`` (0: no bound; ``claiming``
    False: none is started, as while the server stops). Started ones are :attr:`Table.claimed`."""
    for job in table.ordered():
        if job.status == STARTED and job.started_at is not None and \
                table.now > job.started_at + job.timeout + lost_grace:
            _end(table, job, ERROR, "lost: the server running it stopped before it ended", LOST)
    running = table.running()
    for job in table.ordered():
        if job.status not in NOT_RUN:
            continue
        blocked = _blocked(table, job)
        if blocked is not None:
            _end(table, job, ERROR, blocked, PREREQUISITE)
        elif job.status == DISPATCHED and claiming and (not most_running or running < most_running) and \
                all(table.jobs[p].status == FINISHED for p in job.prerequisites):
            table.claimed.append(table.set(attrs.evolve(job, status=STARTED, started_at=table.now,
                                                        updated_at=table.now)))
            running += 1
