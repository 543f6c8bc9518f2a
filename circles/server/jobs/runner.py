"""``Jobs``: the rules of :mod:`circles.server.jobs.model` applied to a store, and the runs of the
jobs they start, through the server's script runner (:class:`~circles.backend.scripts.IScriptRunner`,
whatever protocol it speaks to the workers).

Every change to a caller's jobs (:meth:`Jobs.change`) reads their table, applies one operation
and what follows from it (:func:`~circles.server.jobs.model.advance`), and writes it back if it
is still the table it read (else it is computed again). The process that writes a change that
starts jobs runs them: it hands each script to the circle's workers, as a play, with the job's
caller and timeout, and records how it ended (its output, or its error) in a later change. A run
is the server's, not a connection's: it goes on when the connection that created or started the
job closes, and its outcome is kept for whoever asks.

What one process cannot see happening in another (a job stopped or deleted from another process
while it runs here; a job that another process ended while a ``run_job`` waits for it here; a run
lost with its process) is found by a look at those callers' tables every :data:`WATCH_INTERVAL`
seconds while this process runs jobs or waits for some: one read per caller, not per job. What
this process changes it acts on at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from circles.backend.scripts import (
    SOURCE_JOB,
    BackendUnavailable,
    IScriptRunner,
    NoWorker,
    ScriptFailed,
    ScriptRequest,
    ScriptTimeout,
)
from circles.common.logs import Logger, worth_logging
from circles.common.once import pass_on
from circles.server.jobs.model import (
    BY_CALLER,
    ENDED,
    ERROR,
    FAILED,
    FINISHED,
    LOST,
    NO_WORKER,
    NOT_A_MEMBER,
    STOPPED,
    TIMED_OUT,
    UNAVAILABLE,
    Job,
    JobNotFound,
    Outcome,
    Table,
    advance,
    finish,
)
from circles.server.jobs.store import IJobStore

if TYPE_CHECKING:
    from circles.backend.members import Membership

log = Logger()

#: Seconds between two looks at the tables of the jobs this process runs or waits for.
WATCH_INTERVAL = 1.0
#: Times a change is computed again when other changes to the same caller's jobs keep coming first.
ATTEMPTS = 20
#: Why a job ended in error when something went wrong in this server (logged with its traceback).
INTERNAL = "internal"


@attrs.frozen
class JobLimits:
    """The bounds on jobs (0: no bound), from the server's configuration (whose defaults they have:
    :meth:`circles.server.gateway.Gateway` makes them)."""

    ttl: float  # seconds a job lives from its creation (--job-ttl)
    per_caller: int  # live jobs of one caller (--max-jobs-per-caller)
    running_per_caller: int  # of those, running at once (--max-running-jobs-per-caller)
    total: int  # live jobs of every caller (--max-jobs)


class Jobs:
    """A server process's jobs: changes to callers' tables in ``store``, and the runs they start.

    :param clock: the time of every job (its IReactorTime), and of the looks.
    :param scripts: runs the jobs' scripts.
    :param store: where tables live (:class:`~circles.server.jobs.store.IJobStore`).
    :param members: the circles' policies (None: every circle is open), asked before each run.
    """

    def __init__(self, clock: IReactorTime, scripts: IScriptRunner, store: IJobStore, limits: JobLimits,
                 members: Callable[[], Membership | None] = lambda: None) -> None:
        self.clock = clock
        self.scripts = scripts
        self.store = store
        self.limits = limits
        self._members = members
        self.stopping = False  # the server stops: no job is started any more
        self._running: dict[str, _Watched] = {}  # job id -> its run's play here
        self._runs: set[Deferred] = set()  # the runs in progress, their outcome's recording included
        self._waiters: dict[str, _Watched] = {}  # job id -> who waits for its end here
        self._to_launch: list[tuple[Job, int]] = []
        self._launching = False
        self._tick: IDelayedCall | None = None
        self.failures = 0  # outcomes that could not be recorded, looks that failed (logged: the 1st, 10th...)

    # --- changes ---------------------------------------------------------------------------

    def change(self, caller: str, operation: Callable[[Table], Any]) -> Deferred:
        """Fire with (what ``operation`` returned, the table after the change) once ``caller``'s
        jobs are changed by ``operation`` (a function of :mod:`circles.server.jobs.model` on the
        table; it may raise a :class:`~circles.server.jobs.model.JobError`, and then nothing is
        written) and by what follows from it. A change that changes nothing writes nothing: a look
        is ``lambda table: None``.

        Cancelling the Deferred stops waiting for it, not the change: one whose write may have
        reached the store is carried through (the jobs it starts are run)."""
        answer: Deferred = Deferred()
        ensureDeferred(self._change(caller, operation)).addBoth(pass_on, answer)
        return answer

    async def _change(self, caller: str, operation: Callable[[Table], Any]) -> tuple[Any, Table]:
        for _ in range(ATTEMPTS):
            version, jobs = await self.store.load(caller)
            table = Table(jobs, self.clock.seconds(), version)
            result = operation(table)
            advance(table, self.limits.running_per_caller, claiming=not self.stopping)
            if table.changed:
                saved = await self.store.save(caller, version, table.change(), table.now, self.limits.ttl,
                                              self.limits.total)
                if not saved:
                    continue  # another change came first: compute this one again on what it made
                table.version = version + 1
                self._after(table)
            return result, table
        raise BackendUnavailable("the caller's jobs changed too often at once; try again")

    def _after(self, table: Table) -> None:
        """Act on a change this process wrote: stop the runs here of the jobs it ended or removed,
        answer who waits for them, run the jobs it started."""
        for job in table.ended + table.dropped:
            running = self._running.get(job.id)
            if running is not None:
                running.cancel()
        for job in table.ended:
            self._answer(job.id, job)
        for job in table.dropped:
            self._answer(job.id, Failure(JobNotFound(job.id)))
        self._launch(table.claimed, table.version)

    # --- waiting for a job's end -------------------------------------------------------------

    def wait(self, job: Job, version: int) -> Deferred:
        """Fire with ``job`` as it is once it has ended (at once if it has), or fail with
        :class:`~circles.server.jobs.model.JobNotFound` if it is deleted or expires first.
        ``version``: a version of its caller's table that holds it (what its creation wrote).
        Cancelling it stops waiting, not the job."""
        watched = self._waiters.get(job.id)
        if watched is None:
            watched = self._waiters[job.id] = _Watched(job.caller, version, job.expires_at)
        waiting: Deferred = Deferred(lambda d: self._forget(job.id, d))
        watched.waiting.append(waiting)
        self._watch_soon()
        ensureDeferred(self._look(job.caller))  # it may have ended before anyone waited
        return waiting

    def _forget(self, job_id: str, waiting: Deferred) -> None:
        watched = self._waiters.get(job_id)
        if watched is not None and waiting in watched.waiting:
            watched.waiting.remove(waiting)
            if not watched.waiting:
                del self._waiters[job_id]

    def _answer(self, job_id: str, result: Job | Failure) -> None:
        watched = self._waiters.pop(job_id, None)
        for waiting in watched.waiting if watched is not None else ():
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)

    # --- looks: what other processes did ----------------------------------------------------

    def _watch_soon(self) -> None:
        if self._tick is None and (self._running or self._waiters) and not self.stopping:
            self._tick = self.clock.callLater(WATCH_INTERVAL, self._watch)

    def _watch(self) -> None:
        self._tick = None
        callers = {watched.caller for watched in self._running.values()} | \
            {watched.caller for watched in self._waiters.values()}
        d = gatherResults([ensureDeferred(self._look(caller)) for caller in sorted(callers)])
        d.addBoth(lambda _: self._watch_soon())

    async def _look(self, caller: str) -> None:
        """Look at ``caller``'s table (applying what follows from it, as any change does), and act
        on what another process did: stop runs here of jobs no longer started, answer who waits
        for jobs that ended or are gone."""
        try:
            _, table = await self._change(caller, lambda table: None)
        except Exception as e:  # BackendUnavailable, mostly: the next look tries again
            self._failed("look at the jobs of {caller}: {error}", caller=caller, error=str(e))
            return
        for job_id, running in list(self._running.items()):
            if running.caller == caller and running.over(table, job_id):
                running.cancel()
        for job_id, waited in list(self._waiters.items()):
            if waited.caller == caller and waited.over(table, job_id):
                job = table.jobs.get(job_id)
                self._answer(job_id, job if job is not None else Failure(JobNotFound(job_id)))

    def _failed(self, what: str, **fields: Any) -> None:
        self.failures += 1
        if worth_logging(self.failures):
            log.warn("jobs: could not " + what + " ({n} failures so far)", n=self.failures, **fields)

    # --- runs ----------------------------------------------------------------------------------

    def _launch(self, jobs: list[Job], version: int) -> None:
        """Run ``jobs``, started by the change that wrote ``version``. Runs that end at once (a
        script runner that answers at once) record their end, which may start more: those are
        queued here rather than started deeper in the stack."""
        self._to_launch.extend((job, version) for job in jobs)
        if self._launching:
            return
        self._launching = True
        try:
            while self._to_launch:
                job, version = self._to_launch.pop(0)
                run = ensureDeferred(self._run(job, version))
                self._runs.add(run)
                run.addBoth(self._ran, run)
        finally:
            self._launching = False

    def _ran(self, result, run: Deferred) -> None:
        self._runs.discard(run)
        if isinstance(result, Failure):
            log.failure("a job's run failed", result)

    async def _run(self, job: Job, version: int) -> None:
        log.debug("job {job} of {caller} started in circle {circle}", job=job.id, caller=job.caller, circle=job.circle)
        play = ensureDeferred(self._play(job))
        self._running[job.id] = _Watched(job.caller, version, job.expires_at, play)
        self._watch_soon()
        try:
            outcome = await play
        except CancelledError:
            if self.stopping:
                outcome = Outcome(ERROR, error="lost: the server stopped while it ran", why=LOST)
            else:  # stopped or deleted: the table says so already, and the outcome is nobody's
                outcome = Outcome(STOPPED, error="stopped by its caller (stop_job)", why=BY_CALLER)
        finally:
            self._running.pop(job.id, None)
        try:
            await self._change(job.caller, lambda table: finish(table, job.id, outcome))
        except Exception as e:
            # It stays started in the store, and counts as lost after its deadline.
            self._failed("record the end of job {job}: {error}", job=job.id, error=str(e))
        log.debug("job {job} of {caller}: {status}", job=job.id, caller=job.caller, status=outcome.status)

    async def _play(self, job: Job) -> Outcome:
        """Run ``job``'s script as a play of its caller in its circle: how it ended."""
        try:
            script = await self.store.read(job.id, "script")
            if script is None:
                return Outcome(ERROR, error="its script is gone (the job expired)", why=LOST)
            members = self._members()
            if members is not None:
                verdict = await members.check(job.circle, job.caller)
                if not verdict.allowed:
                    return Outcome(ERROR, error="not a member of this circle: its policy no longer lets the job's "
                                   "caller play", why=NOT_A_MEMBER)
            output = await self.scripts.run(ScriptRequest(job.circle, script, job.caller, SOURCE_JOB, job.timeout))
        except ScriptFailed as e:
            return Outcome(ERROR, e.output, e.detail, FAILED)
        except ScriptTimeout as e:
            by = "its worker stopped it at the worker's --script-timeout" if e.by_worker else \
                f"no answer within its timeout of {job.timeout:g}s"
            return Outcome(ERROR, error=f"timed out: {by}", why=TIMED_OUT)
        except NoWorker:
            return Outcome(ERROR, error="no worker is serving this circle", why=NO_WORKER)
        except BackendUnavailable as e:
            return Outcome(ERROR, error=f"script backend unavailable: {e}", why=UNAVAILABLE)
        except CancelledError:
            raise
        except Exception:
            log.failure("job {job} could not run", job=job.id)
            return Outcome(ERROR, error="internal error (logged on the server)", why=INTERNAL)
        return Outcome(FINISHED, output)

    # --- the end ---------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Jobs this process runs now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Jobs whose end someone waits for here (run_job)."""
        return len(self._waiters)

    def stop(self) -> Deferred:
        """The server stops: start no more jobs, stop the runs here (each ends in error, saying
        so), and fire once their ends are recorded (or could not be). Jobs waiting to start stay
        so, for another server process (or this one, restarted) to start at its caller's next change."""
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.stopping = True
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        for running in list(self._running.values()):
            running.cancel()
        await DeferredList(list(self._runs))



@attrs.define
class _Watched:
    """A job this process runs (``play``) or waits for (``waiting``), as its looks see it: known
    to be in its caller's table at ``version``, until ``expires_at``."""

    caller: str
    version: int
    expires_at: float
    play: Deferred | None = None
    waiting: list[Deferred] = attrs.Factory(list)

    def over(self, table: Table, job_id: str) -> bool:
        """Whether ``table`` says the job is over: ended, or gone. A look may have read the table
        before the change that made or started the job (that change's version is later): it shows
        the job not yet started, or not yet there, which says nothing."""
        job = table.jobs.get(job_id)
        if job is not None:
            return job.status in ENDED
        return table.version >= self.version or table.now >= self.expires_at

    def cancel(self) -> None:
        if self.play is not None:
            self.play.cancel()
