"""The plays of a :class:`~circles.backend.dispatch.RedisScriptRunner` waiting for their reply, and
each reply routed to the play waiting for it, by task id (:class:`Replies`).

A play waits until its reply comes, its deadline passes (:class:`ScriptTimeout`), its caller
gives up (its Deferred cancelled), or the reply connection is lost (:class:`BackendUnavailable`).
The tasks of plays given up on while Redis was away are marked ``expired`` once it is back
(:meth:`Replies.expire_abandoned`), so that no worker runs a script nobody waits for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from circles.backend import tasks
from circles.backend.scripts import BackendUnavailable, ScriptFailed, ScriptRequest, ScriptTimeout
from circles.backend.values import text
from circles.common.logs import Logger
from circles.common.timers import TimerLanes

log = Logger()

#: Seconds a play whose task a worker finished just as its deadline passed waits for the reply
#: already on its way (the finished task's hash no longer holds the result).
REPLY_GRACE = 5.0


class Waiting:
    """A play waiting for its reply. Its deadline is in the :class:`Replies`' timers (its
    timeout's lane, by task id); ``grace`` is the wait for a reply already on its way once the
    deadline passed (:data:`REPLY_GRACE`), while there is one."""

    __slots__ = ("request", "deferred", "grace")

    def __init__(self, request: ScriptRequest, deferred: Deferred) -> None:
        self.request = request
        self.deferred = deferred
        self.grace: IDelayedCall | None = None


class Replies:
    """The plays waiting for a reply on one reply list.

    :param command: runs a Redis command on the runner's command connection (a Deferred; Redis
        trouble fails it with :class:`BackendUnavailable`).
    :param connected: whether a task can be queued and its reply received now.
    """

    def __init__(self, clock: IReactorTime, prefix: str, reply_key: str, command: Callable[..., Deferred],
                 connected: Callable[[], bool]) -> None:
        self.clock = clock
        self.prefix = prefix
        self.reply_key = reply_key
        self._command = command
        self._connected = connected
        self._waiting: dict[str, Waiting] = {}
        # Each play's deadline, by task id: the plays of one timeout (most share the default)
        # behind one call of the clock, not a DelayedCall each in the reactor's heap.
        self._deadlines = TimerLanes(clock, self._timed_out)
        self._abandoned: set[str] = set()  # tasks given up on while Redis was unreachable

    def __len__(self) -> int:
        return len(self._waiting)

    def wait(self, task_id: str, request: ScriptRequest) -> Deferred:
        """A Deferred for the reply of ``task_id``, failed with :class:`ScriptTimeout` once
        ``request.timeout`` passes."""
        result: Deferred = Deferred(lambda _: self._cancelled(task_id))
        self._deadlines.set(request.timeout, task_id)
        self._waiting[task_id] = Waiting(request, result)
        return result

    def _stop_timers(self, task_id: str, entry: Waiting) -> None:
        """``task_id``'s play waits no more: its deadline (and grace) will not fire."""
        self._deadlines.cancel(entry.request.timeout, task_id)
        if entry.grace is not None and entry.grace.active():
            entry.grace.cancel()

    def not_queued(self, task_id: str, failure: Failure) -> None:
        """The task of a play could not be queued: the play fails with ``failure``."""
        entry = self._waiting.pop(task_id, None)
        if entry is not None:
            self._stop_timers(task_id, entry)
            entry.deferred.errback(failure)

    def stop(self, reason: str = "the server is shutting down", abandon: bool = False) -> list[str]:
        """Fail every play waiting with :class:`BackendUnavailable`; their task ids. ``abandon``:
        expire their tasks once Redis is back (:meth:`expire_abandoned`)."""
        waiting, self._waiting = self._waiting, {}
        for task_id, entry in waiting.items():
            self._stop_timers(task_id, entry)
            if abandon:
                self._abandoned.add(task_id)
            entry.deferred.errback(BackendUnavailable(reason))
        return list(waiting)

    def lost(self) -> None:
        """No reply can arrive now: answer everyone waiting rather than leave them hanging, and
        expire their tasks once Redis is back."""
        self.stop("lost the connection to Redis", abandon=True)

    def expire(self, task_id: str, why: str = "") -> Deferred:
        """Mark the task expired unless it already ended; fire with its :class:`tasks.Outcome`.
        ``why`` says why nobody waits for it any more (our protocol's EXPIRE does not keep it)."""
        now = self.clock.seconds()
        d = self._command("eval", tasks.EXPIRE, [tasks.task_key(self.prefix, task_id)],
                          [tasks.timestamp(now), tasks.STATUS_TTL])
        d.addCallback(lambda r: tasks.Outcome(task_id, *[text(v) for v in r]))
        return d

    def expire_abandoned(self) -> None:
        abandoned, self._abandoned = self._abandoned, set()
        for task_id in abandoned:
            self.expire(task_id, "nobody waits for it any more (the server lost Redis meanwhile)").addErrback(
                lambda _: None)

    # -- timeouts -------------------------------------------------------------------------------

    def _timed_out(self, task_id: str) -> None:
        entry = self._waiting.get(task_id)
        if entry is None:
            return
        # debug: one line per play a client times out; the session logs it within bounds.
        log.debug("task {task} on circle {circle} timed out after {timeout}s",
                  task=task_id, circle=entry.request.circle, timeout=entry.request.timeout)

        def settled(outcome: Any) -> None:
            if self._waiting.get(task_id) is not entry:
                return  # its reply came meanwhile, or the client left
            if isinstance(outcome, tasks.Outcome) and outcome.status in (tasks.COMPLETED, tasks.ERROR):
                self._finished_at_deadline(task_id, entry, outcome)
                return
            del self._waiting[task_id]
            entry.deferred.errback(ScriptTimeout())

        self.expire(task_id, f"timed out after {entry.request.timeout:g}s").addBoth(settled)

    def _finished_at_deadline(self, task_id: str, entry: Waiting, outcome: tasks.Outcome) -> None:
        """A worker finished just before the deadline: its reply is already on the reply list
        (FINISH pushed it in the same step), and routes to this entry."""
        entry.grace = self.clock.callLater(REPLY_GRACE, self._gave_up, task_id)

    def _gave_up(self, task_id: str) -> None:
        entry = self._waiting.pop(task_id, None)
        if entry is not None:
            entry.deferred.errback(ScriptTimeout())

    def _cancelled(self, task_id: str) -> None:
        """The caller gave up (its connection closed): stop waiting, and expire the task so no
        worker runs a script nobody waits for (once Redis is back, if it is away now)."""
        entry = self._waiting.pop(task_id, None)
        if entry is None:
            return
        self._stop_timers(task_id, entry)
        if self._connected():
            self.expire(task_id, "its caller is gone (the connection closed)").addErrback(
                lambda _: self._abandoned.add(task_id))
        else:
            self._abandoned.add(task_id)

    # -- replies --------------------------------------------------------------------------------

    def route(self, entry: str) -> None:
        """A reply read from the reply list: to the play waiting for it, if one still does."""
        try:
            task_id, outcome = tasks.decode_reply(entry)
        except tasks.MalformedReply as e:
            log.warn("ignored a malformed reply on {key}: {why}", key=self.reply_key, why=str(e))
            return
        waiting = self._waiting.pop(task_id, None)
        if waiting is None:
            log.debug("reply for task {task} that nobody waits for (timed out?)", task=task_id)
            return
        self._stop_timers(task_id, waiting)
        if outcome is not None:
            self._settle(waiting.deferred, outcome)
            return
        # A bare task id: the result is in the task hash, read and deleted in one step. Callbacks,
        # not a coroutine: this runs for every reply.
        d = self._command("eval", tasks.TAKE_RESULT, [tasks.task_key(self.prefix, task_id)], [])
        d.addCallback(lambda r: tasks.Outcome(task_id, *[text(v) for v in r]))
        d.addCallbacks(lambda o: self._settle(waiting.deferred, o), waiting.deferred.errback)

    def settle(self, task_id: str, outcome: tasks.Outcome) -> None:
        """The outcome of ``task_id``, read otherwise than from a reply: to the play waiting for it."""
        waiting = self._waiting.pop(task_id, None)
        if waiting is not None:
            self._stop_timers(task_id, waiting)
            self._settle(waiting.deferred, outcome)

    def waiting_for(self) -> list[str]:
        """The task ids of the plays waiting now."""
        return list(self._waiting)

    def waits_for(self, task_id: str) -> bool:
        return task_id in self._waiting

    @staticmethod
    def _settle(deferred: Deferred, outcome: tasks.Outcome) -> None:
        if outcome.status == tasks.COMPLETED:
            deferred.callback(outcome.output)
        elif outcome.timed_out:
            deferred.errback(ScriptTimeout(by_worker=True))  # the worker's timeout: answered as ours (-32003)
        elif outcome.status == tasks.ERROR:
            deferred.errback(ScriptFailed(outcome.error, outcome.output))
        else:
            log.warn("task {task} replied with status {status!r}", task=outcome.task_id, status=outcome.status)
            deferred.errback(ScriptFailed(f"the worker replied with status {outcome.status!r}"))
