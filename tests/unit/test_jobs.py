"""Jobs (the hero contract's jobs methods), in one process: the rules over one caller's table
(circles.server.jobs.model), the store in memory, the runner (circles.server.jobs.runner.Jobs) on a
Clock, and the methods as a hero connection calls them (circles.server.session.jobs).

Two ``Jobs`` on one in-memory store are two server processes sharing a Redis: what one does,
the other finds at its next look. The store in Redis, and a real server, workers and clients,
are tests/integration/test_jobs.py.
"""

from __future__ import annotations

import json

import attrs
import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from circles.backend.scripts import SOURCE_JOB, IScriptRunner, ScriptFailed, ScriptTimeout
from circles.common.jsonrpc import INVALID_PARAMS
from circles.common.wire import (
    AUTH_REQUIRED,
    BACKEND_UNAVAILABLE,
    JOB_NOT_FOUND,
    JOB_STATE,
    SCRIPT_FAILED,
    SCRIPT_TIMEOUT,
    TOO_MANY_REQUESTS,
)
from circles.server.config import Config
from circles.server.gateway import Gateway
from circles.server.jobs import model
from circles.server.jobs.model import (
    CREATED,
    DISPATCHED,
    ERROR,
    FINISHED,
    STARTED,
    STOPPED,
    JobNotFound,
    Outcome,
    PrerequisiteNotFound,
    Table,
    TooManyJobs,
    WrongState,
    is_job_id,
    new_job_id,
)
from circles.server.jobs.runner import WATCH_INTERVAL, JobLimits, Jobs
from circles.server.jobs.store import MemoryJobStore
from circles.server.session.contracts import CONTRACTS

from ..inmemory import fired, session_layer
from ..support import Key

CIRCLE, OTHER_CIRCLE = Key().pubkey, Key().pubkey
ALICE, BOB = Key(), Key()
TTL = 3600.0


# --- the rules, over one table ------------------------------------------------------------------


def _create(table: Table, script: str = "s", circle: str = CIRCLE, **kw) -> model.Job:
    kw.setdefault("ttl", TTL)
    return model.create(table, job_id=new_job_id(), caller=ALICE.pubkey, circle=circle, script=script,
                        script_type="rhai", timeout=10.0, **kw)


def _then(table: Table, now: float | None = None) -> Table:
    """The table as the next change reads it (what this one wrote)."""
    return Table(dict(table.jobs), table.now if now is None else now)


def test_job_ids_are_server_chosen_uuids_and_nothing_else_passes():
    made = {new_job_id() for _ in range(100)}
    assert len(made) == 100 and all(is_job_id(job_id) for job_id in made)
    job_id = next(iter(made))
    for bad in (job_id.upper(), job_id + "0", job_id[:-1], "{" + job_id + "}", job_id.replace("-", ""),
                "00000000-0000-0000-0000-000000000000",  # not version 4
                "../../etc", "*", "", "x" * 36, 7, None, ["a"]):
        assert not is_job_id(bad), bad


def test_a_created_job_waits_for_start_then_runs_when_its_prerequisites_finished():
    table = Table({}, 0.0)
    first = _create(table)
    second = _create(table, prerequisites=[first.id, first.id])  # named twice: once
    assert second.prerequisites == (first.id,) and second.seq > first.seq
    model.advance(table)
    assert table.claimed == [] and {j.status for j in table.jobs.values()} == {CREATED}
    assert table.change().data[first.id] == {"script": "s"} and {j.id for j in table.change().created} == \
        {first.id, second.id}

    table = _then(table)
    model.start(table, CIRCLE, second.id)
    model.advance(table)
    assert table.claimed == [] and table.jobs[second.id].status == DISPATCHED  # its prerequisite has not run
    with pytest.raises(WrongState):
        model.start(table, CIRCLE, second.id)

    table = _then(table, 5.0)
    model.start(table, CIRCLE, first.id)
    model.advance(table)
    assert [j.id for j in table.claimed] == [first.id] and table.jobs[first.id].started_at == 5.0

    table = _then(table, 6.0)
    model.finish(table, first.id, Outcome(FINISHED, "out"))
    model.advance(table)
    assert [j.id for j in table.claimed] == [second.id]
    assert table.change().data == {first.id: {"output": "out"}}
    assert table.dependents(table.jobs[first.id]) == [second.id]


def test_a_failed_stopped_or_gone_prerequisite_fails_its_whole_chain_naming_it():
    table = Table({}, 0.0)
    a = _create(table, start=True)
    b = _create(table, prerequisites=[a.id])  # created, never started: fails too
    c = _create(table, prerequisites=[b.id], start=True)
    model.advance(table)
    assert [j.id for j in table.claimed] == [a.id]
    table = _then(table, 1.0)
    model.finish(table, a.id, Outcome(ERROR, error="division by zero", why=model.FAILED))
    model.advance(table)
    assert table.jobs[b.id].status == table.jobs[c.id].status == ERROR  # one pass: oldest first
    assert table.jobs[b.id].error == f"prerequisite {a.id} failed: division by zero"
    assert table.jobs[c.id].error.startswith(f"prerequisite {b.id} failed: prerequisite {a.id} failed")
    assert table.jobs[c.id].why == model.PREREQUISITE and [j.id for j in table.ended] == [a.id, b.id, c.id]

    table = Table({}, 0.0)
    a, d = _create(table), _create(table)
    b = _create(table, prerequisites=[a.id, d.id], start=True)
    model.stop(table, CIRCLE, a.id)
    model.advance(table)
    assert table.jobs[b.id].error == f"prerequisite {a.id} was stopped"
    with pytest.raises(WrongState):
        model.stop(table, CIRCLE, a.id)  # ended already

    table = Table({}, 0.0)
    a = _create(table)
    b = _create(table, prerequisites=[a.id])
    table = _then(table)
    model.delete(table, CIRCLE, a.id)
    model.advance(table)
    assert table.jobs[b.id].error == f"prerequisite {a.id} no longer exists (deleted, or expired)"


def test_prerequisites_must_be_the_callers_own_jobs_in_the_same_circle():
    table = Table({}, 0.0)
    elsewhere = _create(table, circle=OTHER_CIRCLE)
    for prerequisite in (elsewhere.id, new_job_id()):
        with pytest.raises(PrerequisiteNotFound):
            _create(table, prerequisites=[prerequisite])
    with pytest.raises(JobNotFound):
        table.owned(CIRCLE, elsewhere.id)  # another circle's job is not found from this one
    assert table.ordered(CIRCLE) == [] and len(table.ordered()) == 1


def test_running_jobs_are_bounded_per_caller_and_the_oldest_waiting_starts_first():
    table = Table({}, 0.0)
    jobs = [_create(table, start=True) for _ in range(5)]
    model.advance(table, most_running=2)
    assert [j.id for j in table.claimed] == [jobs[0].id, jobs[1].id]
    table = _then(table)
    model.finish(table, jobs[1].id, Outcome(FINISHED))
    model.advance(table, most_running=2)
    assert [j.id for j in table.claimed] == [jobs[2].id]
    table = _then(table)
    model.advance(table, most_running=2, claiming=False)  # the server stops: nothing more starts
    assert table.claimed == [] and not table.changed


def test_a_run_past_its_deadline_is_lost():
    table = Table({}, 0.0)
    job = _create(table, start=True)
    model.advance(table)
    table = _then(table, 10.0 + model.LOST_GRACE)  # its timeout is 10
    model.advance(table)
    assert table.jobs[job.id].status == STARTED
    table = _then(table, 10.5 + model.LOST_GRACE)
    model.advance(table)
    assert table.jobs[job.id].status == ERROR and table.jobs[job.id].why == model.LOST
    assert model.finish(_then(table), job.id, Outcome(FINISHED)) is None  # a late outcome is nobody's


def test_the_caller_bound_and_expiry():
    table = Table({}, 0.0)
    first = _create(table, most=2, ttl=100)
    _create(table, most=2, ttl=200)
    with pytest.raises(TooManyJobs) as refused:
        _create(table, most=2)
    assert (refused.value.limit, refused.value.of) == (2, "caller")
    later = _then(table, 100.0)  # the first one's expiry: gone, and removed by the next change
    assert first.id not in later.jobs and later.change().removed == (first.id,)
    _create(later, most=2)


def test_errors_are_cut_to_their_bound():
    table = Table({}, 0.0)
    job = _create(table, start=True)
    model.advance(table)
    model.finish(table, job.id, Outcome(ERROR, error="x" * 10_000, why=model.FAILED))
    assert len(table.jobs[job.id].error) < model.MAX_ERROR + 50 and table.jobs[job.id].error.endswith("cut)")


def test_a_job_reads_back_as_it_was_written():
    table = Table({}, 0.0)
    job = _create(table, prerequisites=[_create(table).id])
    assert model.Job.from_json(job.to_json()) == job


# --- the store in memory -----------------------------------------------------------------------


def test_the_memory_store_writes_only_onto_the_version_read_and_bounds_every_callers_jobs():
    clock = Clock()
    store = MemoryJobStore(clock)
    version, jobs = fired(store.load("alice"))
    assert (version, jobs) == (0, {})
    table = Table(jobs, 0.0)
    job = _create(table)
    assert fired(store.save("alice", 0, table.change(), 0.0, TTL, 2)) is True
    assert fired(store.save("alice", 0, table.change(), 0.0, TTL, 2)) is False  # another change came first
    assert fired(store.load("alice"))[0] == 1 and fired(store.read(job.id, "script")) == "s"
    other = Table({}, 0.0)
    _create(other)
    _create(other)
    with pytest.raises(TooManyJobs) as full:
        fired(store.save("bob", 0, other.change(), 0.0, TTL, 2))  # 1 + 2 > 2: nothing written
    assert full.value.of == "server" and fired(store.load("bob")) == (0, {}) and store.live() == 1
    clock.advance(TTL)
    assert fired(store.read(job.id, "script")) is None and fired(store.load("alice")) == (0, {}) and store.live() == 0


# --- the runner: two processes on one store, on a Clock -------------------------------------------


@implementer(IScriptRunner)
class Workers:
    """A script runner whose runs end when the test says (each a Deferred); cancelled ones are noted."""

    def __init__(self) -> None:
        self.runs: list = []  # (request, Deferred)
        self.cancelled: list = []

    def is_connected(self) -> bool:
        return True

    def run(self, request) -> Deferred:
        d: Deferred = Deferred(lambda d: self.cancelled.append(request.script))
        self.runs.append((request, d))
        return d

    def end(self, script: str, result) -> None:
        [d] = [d for request, d in self.runs if request.script == script and not d.called]
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)

    def scripts(self) -> list:
        return [request.script for request, _ in self.runs]


LIMITS = JobLimits(ttl=TTL, per_caller=10, running_per_caller=2, total=100)


def _processes(n: int = 2, limits: JobLimits = LIMITS):
    """``n`` server processes' Jobs on one store (as on one Redis), each with its own workers."""
    clock = Clock()
    store = MemoryJobStore(clock)
    return clock, store, [Jobs(clock, Workers(), store, limits) for _ in range(n)]


def _new(jobs: Jobs, script: str, start: bool = True, prerequisites=(), caller: str = ALICE.pubkey) -> model.Job:
    job, _ = fired(jobs.change(caller, lambda table: model.create(
        table, job_id=new_job_id(), caller=caller, circle=CIRCLE, script=script, script_type="rhai", timeout=10.0,
        prerequisites=prerequisites, ttl=TTL, most=10, start=start)))
    return job


def _status(jobs: Jobs, job_id: str, caller: str = ALICE.pubkey) -> model.Job:
    job, _ = fired(jobs.change(caller, lambda table: table.owned(CIRCLE, job_id)))
    return job


def _version(jobs: Jobs, caller: str = ALICE.pubkey) -> int:
    """The version of ``caller``'s table now."""
    _, table = fired(jobs.change(caller, lambda table: None))
    return table.version


def test_a_job_runs_as_a_play_of_its_caller_and_its_outcome_is_kept():
    clock, store, [jobs] = _processes(1)
    job = _new(jobs, "print(1)")
    [(request, _)] = jobs.scripts.runs
    assert (request.circle, request.caller, request.source, request.timeout) == (CIRCLE, ALICE.pubkey, SOURCE_JOB, 10.0)
    assert _status(jobs, job.id).status == STARTED and jobs.running == 1
    jobs.scripts.end("print(1)", "1\n")
    assert _status(jobs, job.id).status == FINISHED and fired(store.read(job.id, "output")) == "1\n"
    failing = _new(jobs, "fail")
    jobs.scripts.end("fail", ScriptFailed("boom", "half"))
    ended = _status(jobs, failing.id)
    assert (ended.status, ended.error, ended.why) == (ERROR, "boom", model.FAILED)
    assert fired(store.read(failing.id, "output")) == "half" and jobs.running == 0


def test_at_most_the_running_bound_run_and_the_next_starts_when_one_ends():
    clock, store, [jobs] = _processes(1)
    for i in range(4):
        _new(jobs, f"job {i}")
    assert jobs.scripts.scripts() == ["job 0", "job 1"]
    jobs.scripts.end("job 1", ScriptTimeout())
    assert jobs.scripts.scripts() == ["job 0", "job 1", "job 2"]


def test_a_dependent_started_in_one_process_runs_where_its_prerequisite_ends():
    clock, store, [one, two] = _processes()
    first = _new(one, "first")
    second = _new(two, "second", prerequisites=[first.id])
    assert _status(two, second.id).status == DISPATCHED and two.scripts.runs == []
    one.scripts.end("first", "done")
    assert one.scripts.scripts() == ["first", "second"]  # the process that wrote the end started it
    one.scripts.end("second", "done too")
    assert _status(two, second.id).status == FINISHED


def test_stop_job_cancels_the_run_here_at_once_and_in_another_process_at_its_next_look():
    clock, store, [one, two] = _processes()
    here = _new(one, "here")
    fired(one.change(ALICE.pubkey, lambda table: model.stop(table, CIRCLE, here.id)))
    assert one.scripts.cancelled == ["here"] and _status(one, here.id).status == STOPPED

    there = _new(one, "there")
    fired(two.change(ALICE.pubkey, lambda table: model.stop(table, CIRCLE, there.id)))
    assert one.scripts.cancelled == ["here"]  # not yet: process one has not looked
    clock.advance(WATCH_INTERVAL)
    assert one.scripts.cancelled == ["here", "there"]
    ended = _status(one, there.id)
    assert (ended.status, ended.error) == (STOPPED, "stopped by its caller (stop_job)")

    gone = _new(one, "gone")
    fired(two.change(ALICE.pubkey, lambda table: model.delete(table, CIRCLE, gone.id)))
    clock.advance(WATCH_INTERVAL)
    assert one.scripts.cancelled[-1] == "gone" and one.running == 0


def test_waiting_for_a_job_that_ends_in_another_process():
    clock, store, [one, two] = _processes()
    first = _new(one, "first")
    waited = _new(two, "waited", prerequisites=[first.id])
    ended: list = []
    two.wait(waited, _version(two)).addBoth(ended.append)
    one.scripts.end("first", "ok")  # process one starts the dependent, and runs it
    one.scripts.end("waited", "42")
    assert ended == []
    clock.advance(WATCH_INTERVAL)
    assert [job.status for job in ended] == [FINISHED]

    deleted = _new(one, "deleted")
    lost: list = []
    two.wait(deleted, _version(two)).addBoth(lost.append)
    fired(one.change(ALICE.pubkey, lambda table: model.delete(table, CIRCLE, deleted.id)))
    clock.advance(WATCH_INTERVAL)
    assert lost[0].check(JobNotFound)

    cancelled = two.wait(_new(one, "long"), _version(two))
    cancelled.addErrback(lambda f: f.trap(CancelledError))
    cancelled.cancel()  # the waiter is gone; the job is not
    assert two.waiting == 0 and one.running == 1


class Held:
    """A store whose next load, once armed, answers only when the test says, with the table as it
    was when asked: a look that read the table before later changes."""

    def __init__(self, store: MemoryJobStore) -> None:
        self.store = store
        self.armed = False
        self.held: list = []

    def load(self, caller):
        if not self.armed:
            return self.store.load(caller)
        self.armed = False
        later: Deferred = Deferred()
        self.held.append((later, fired(self.store.load(caller))))
        return later

    def release(self) -> None:
        for later, table in self.held:
            later.callback(table)

    def save(self, *args):
        return self.store.save(*args)

    def read(self, job_id, field):
        return self.store.read(job_id, field)


def test_a_look_that_read_the_table_before_a_job_started_neither_stops_it_nor_answers_for_it():
    clock = Clock()
    held = Held(MemoryJobStore(clock))
    jobs = Jobs(clock, Workers(), held, LIMITS)
    _new(jobs, "running")  # something to look at
    held.armed = True
    clock.advance(WATCH_INTERVAL)  # the look reads the table: held
    late = _new(jobs, "late")  # made and started after the look read the table
    ended: list = []
    jobs.wait(late, _version(jobs)).addBoth(ended.append)
    held.release()  # the look sees a table without it
    assert jobs.scripts.cancelled == [] and jobs.running == 2 and ended == []
    jobs.scripts.end("late", "ok")
    assert [job.status for job in ended] == [FINISHED]


def test_a_run_lost_with_its_process_ends_in_error_and_frees_its_slot():
    limits = attrs.evolve(LIMITS, running_per_caller=1)
    clock, store, [crashed, alive] = _processes(2, limits)
    lost = _new(crashed, "lost")
    waiting = _new(alive, "waiting")
    assert alive.scripts.runs == []  # one running slot, taken
    crashed.stopping = True  # gone without a word: it never records anything again
    clock.advance(10.0 + model.LOST_GRACE + 1)
    _status(alive, waiting.id)  # any look applies what follows
    assert _status(alive, lost.id).why == model.LOST and alive.scripts.scripts() == ["waiting"]


def test_stopping_a_server_ends_its_runs_in_error_and_starts_nothing_more():
    clock, store, [jobs] = _processes(1, attrs.evolve(LIMITS, running_per_caller=1))
    running = _new(jobs, "running")
    queued = _new(jobs, "queued")
    stopped = jobs.stop()
    assert fired(stopped) is None and jobs.scripts.cancelled == ["running"]
    ended = _status(jobs, running.id)
    assert (ended.status, ended.why, ended.error) == (ERROR, model.LOST, "lost: the server stopped while it ran")
    assert _status(jobs, queued.id).status == DISPATCHED and len(jobs.scripts.runs) == 1


class Meddled:
    """A store on which another process writes a change between each load and the first save."""

    def __init__(self, store: MemoryJobStore, meddle) -> None:
        self.store = store
        self.meddle = meddle
        self.saves = 0

    def load(self, caller):
        return self.store.load(caller)

    def read(self, job_id, field):
        return self.store.read(job_id, field)

    def save(self, caller, version, change, now, ttl, most):
        self.saves += 1
        if self.saves == 1:
            self.meddle()
        return self.store.save(caller, version, change, now, ttl, most)


def test_a_change_computed_on_a_table_another_process_changed_is_computed_again():
    clock = Clock()
    store = MemoryJobStore(clock)
    other = Jobs(clock, Workers(), store, LIMITS)
    first = _new(other, "first", start=False)
    meddling = Meddled(store, lambda: fired(other.change(ALICE.pubkey,
                                                         lambda table: model.start(table, CIRCLE, first.id))))
    jobs = Jobs(clock, Workers(), meddling, LIMITS)
    second = _new(jobs, "second", start=False)
    assert meddling.saves == 2  # refused once, computed again
    assert _status(jobs, first.id).status == STARTED and _status(jobs, second.id).status == CREATED


# --- the methods, as a hero connection calls them ------------------------------------------------


class Connection:
    """A hero session on a gateway: JSON-RPC in, the reply object out (already answered)."""

    def __init__(self, gateway: Gateway, circle: str = CIRCLE, key: Key | None = None) -> None:
        self.session = session_layer(gateway).open(circle, contract=CONTRACTS["hero"])
        if key is not None:
            nonce = self.call("fetch_nonce", {"pubkey": key.pubkey})["result"]
            assert self.call("authenticate", {"pubkey": key.pubkey, "signature": key.eth_sign(nonce)})["result"] is True

    def send(self, method: str, params=None) -> Deferred:
        message = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            message["params"] = params
        reply = self.session.answer(json.dumps(message))
        d = reply if isinstance(reply, Deferred) else succeed(reply)
        return d.addCallback(lambda text: None if text is None else json.loads(text))  # None: no answer

    def call(self, method: str, params=None) -> dict:
        return fired(self.send(method, params))

    def result(self, method: str, params=None):
        reply = self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    def error(self, method: str, params=None) -> dict:
        reply = self.call(method, params)
        assert "error" in reply, reply
        return reply["error"]


class CountingStore(MemoryJobStore):
    """The store in memory, counting the tables it is asked for."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.loads = 0

    def load(self, caller):
        self.loads += 1
        return super().load(caller)


def _server(**config):
    clock = Clock()
    workers = Workers()
    gateway = Gateway(Config(**config), clock, workers)
    store = CountingStore(clock)
    gateway.use_job_store(store)
    return clock, workers, gateway, store


def _job(script: str = "print(1)", **fields) -> dict:
    return {"job": {"script": script, "script_type": "rhai", **fields}}


def test_every_jobs_method_needs_an_authenticated_key_whatever_auth():
    clock, workers, gateway, store = _server(auth_required=False)
    anonymous = Connection(gateway)
    job_id = new_job_id()
    for method, params in (("create_job", _job()), ("run_job", {"script": "1", "script_type": "rhai"}),
                           ("start_job", [job_id]), ("get_job_status", [job_id]), ("get_job_output", [job_id]),
                           ("get_job_logs", [job_id]), ("list_jobs", None), ("stop_job", [job_id]),
                           ("delete_job", [job_id]), ("clear_all_jobs", None)):
        assert anonymous.error(method, params)["code"] == AUTH_REQUIRED, method
    assert store.loads == 0
    anonymous.send("play", {"script": "x"})
    assert workers.scripts() == ["x"]  # while play stays open to anonymous callers without --auth


def test_another_key_or_circle_gets_not_found_exactly_as_for_a_job_that_never_was():
    clock, workers, gateway, store = _server()
    alice, bob = Connection(gateway, key=ALICE), Connection(gateway, key=BOB)
    alice_elsewhere = Connection(gateway, OTHER_CIRCLE, key=ALICE)
    job_id = alice.result("create_job", _job())
    never = bob.error("get_job_status", [new_job_id()])
    for who in (bob, alice_elsewhere):
        for method in ("start_job", "get_job_status", "get_job_output", "get_job_logs", "stop_job", "delete_job"):
            error = who.error(method, [job_id])
            assert (error["code"], error["message"]) == (JOB_NOT_FOUND, "Job not found") == \
                (never["code"], never["message"]), method
        assert who.result("list_jobs") == {"jobs": [], "total": 0}
        assert who.result("clear_all_jobs") == {"success": True, "deleted": 0}
        refused = who.error("create_job", _job(prerequisites=[job_id]))
        assert refused["code"] == INVALID_PARAMS and "no job of this key in this circle" in refused["message"]
    assert alice.result("get_job_status", [job_id])["status"] == CREATED  # untouched
    assert alice.result("list_jobs")["total"] == 1


def test_a_job_end_to_end_over_a_hero_connection():
    clock, workers, gateway, store = _server()
    alice = Connection(gateway, key=ALICE)
    job_id = alice.result("create_job", _job(timeout=5, caller_id=ALICE.uncompressed, context_id=CIRCLE))
    assert is_job_id(job_id)
    status = alice.result("get_job_status", {"job_id": job_id})
    assert (status["status"], status["caller_id"], status["context_id"], status["timeout"]) == \
        (CREATED, ALICE.pubkey, CIRCLE, 5)
    assert status["created_at"] == "1970-01-01T00:00:00.000Z" and status["expires_at"] == "1970-01-02T00:00:00.000Z"
    assert alice.error("get_job_output", [job_id])["code"] == JOB_STATE
    assert alice.result("get_job_logs", [job_id]) == []
    clock.advance(2.5)
    assert alice.result("start_job", [job_id]) == {"success": True}
    assert alice.result("get_job_status", [job_id])["started_at"] == "1970-01-01T00:00:02.500Z"
    workers.end("print(1)", "one\ntwo\n")
    assert alice.result("get_job_output", [job_id]) == "one\ntwo\n"
    assert alice.result("get_job_logs", [job_id]) == ["one", "two"]
    state = alice.error("start_job", [job_id])
    assert state["code"] == JOB_STATE and state["data"] == {"job_id": job_id, "status": FINISHED}
    assert "start_job takes a created job, and this one is finished" in state["message"]

    failing = alice.result("create_job", _job("fail"))
    alice.result("start_job", [failing])
    workers.end("fail", ScriptFailed("Variable not found: x", "printed\n"))
    failed = alice.error("get_job_output", [failing])
    assert failed["code"] == SCRIPT_FAILED and failed["data"] == {"error": "Variable not found: x", "output": "printed\n"}
    assert alice.result("get_job_logs", [failing]) == ["printed", "error: Variable not found: x"]
    assert alice.result("get_job_status", [failing])["error"] == "Variable not found: x"


def test_run_job_answers_the_output_and_deletes_its_job():
    clock, workers, gateway, store = _server()
    alice = Connection(gateway, key=ALICE)
    answered = alice.send("run_job", {"script": "slow", "script_type": "RHAI", "timeout": 3})
    assert not answered.called and alice.result("list_jobs")["total"] == 1
    assert len(alice.session.plays) == 1  # counted with the connection's plays
    workers.end("slow", "42")
    assert fired(answered)["result"] == "42" and alice.result("list_jobs")["total"] == 0

    timed_out = alice.send("run_job", ["slow", "rhai"])
    workers.end("slow", ScriptTimeout())
    assert fired(timed_out)["error"]["code"] == SCRIPT_TIMEOUT


def test_a_job_runs_on_when_its_connection_closes():
    clock, workers, gateway, store = _server()
    alice = Connection(gateway, key=ALICE)
    started = alice.result("create_job", _job("long"))
    alice.result("start_job", [started])
    waiting = alice.send("run_job", {"script": "waited", "script_type": "rhai"})
    alice.session.close()  # the connection is gone: nobody to answer, and nothing stopped
    assert fired(waiting) is None and workers.cancelled == [] and gateway.jobs.waiting == 0
    workers.end("long", "long done")
    workers.end("waited", "waited done")
    again = Connection(gateway, key=ALICE)
    assert again.result("get_job_output", [started]) == "long done"
    [kept] = [job for job in again.result("list_jobs")["jobs"] if job["job_id"] != started]
    assert kept["status"] == FINISHED and again.result("get_job_output", [kept["job_id"]]) == "waited done"


def test_stop_job_stops_the_run_and_fails_its_dependents():
    clock, workers, gateway, store = _server()
    alice = Connection(gateway, key=ALICE)
    first = alice.result("create_job", _job("first"))
    second = alice.result("create_job", _job("second", prerequisites=[first]))
    alice.result("start_job", [first])
    alice.result("start_job", [second])
    assert alice.result("get_job_status", [second])["status"] == DISPATCHED
    assert alice.result("get_job_status", [first])["dependents"] == [second]
    assert alice.result("stop_job", [first]) == {"success": True}
    assert workers.cancelled == ["first"]
    assert alice.result("get_job_status", [first])["status"] == STOPPED
    status = alice.result("get_job_status", [second])
    assert (status["status"], status["error"]) == (ERROR, f"prerequisite {first} was stopped")
    refused = alice.error("get_job_output", [second])
    assert refused["code"] == JOB_STATE and f"prerequisite {first} was stopped" in refused["message"]
    assert alice.error("stop_job", [first])["code"] == JOB_STATE
    assert alice.result("get_job_logs", [first]) == ["stopped by its caller (stop_job)"]


def test_malformed_ids_are_refused_before_any_store_is_asked():
    clock, workers, gateway, store = _server()
    alice = Connection(gateway, key=ALICE)
    for bad in ("x", "../../x", "*", new_job_id().upper(), 12):
        for method in ("start_job", "get_job_status", "get_job_output", "get_job_logs", "stop_job", "delete_job"):
            assert alice.error(method, [bad])["code"] == INVALID_PARAMS, (method, bad)
        assert alice.error("create_job", _job(prerequisites=[bad]))["code"] == INVALID_PARAMS
    assert store.loads == 0


@pytest.mark.parametrize("job, why", [
    ({"script": "1", "script_type": "python"}, "'job.script_type' 'python' is not one this server runs: rhai"),
    ({"script": "1"}, "'job.script_type' is required"),
    ({"script_type": "rhai"}, "'job.script' is required"),
    ({"script": "1", "script_type": "rhai", "retries": 3}, "unknown field 'job.retries'"),
    ({"script": 1, "script_type": "rhai"}, "'job.script' must be a string"),
    ({"script": "1", "script_type": "rhai", "timeout": 0}, "'job.timeout' must be a positive number"),
    ({"script": "1", "script_type": "rhai", "timeout": "1"}, "'job.timeout' must be a number"),
    ({"script": "1", "script_type": "rhai", "caller_id": BOB.pubkey}, "'job.caller_id' must be the authenticated key"),
    ({"script": "1", "script_type": "rhai", "caller_id": "02zz"}, "'job.caller_id': "),
    ({"script": "1", "script_type": "rhai", "context_id": OTHER_CIRCLE}, "'job.context_id' must be this connection's"),
    ({"script": "1", "script_type": "rhai", "prerequisites": "x"}, "'job.prerequisites' must be an array"),
    ({"script": "1", "script_type": "rhai", "prerequisites": [new_job_id() for _ in range(17)]},
     "'job.prerequisites' names 17 jobs, more than 16"),
    ({"script": "\ud800", "script_type": "rhai"}, "'job.script' is not valid Unicode"),
], ids=["script_type", "no script_type", "no script", "unknown field", "script type", "timeout 0", "timeout type",
        "caller_id", "caller_id form", "context_id", "prerequisites type", "too many prerequisites", "surrogate"])
def test_a_job_that_is_wrong_is_refused_saying_why(job, why):
    clock, workers, gateway, store = _server()
    alice = Connection(gateway, key=ALICE)
    error = alice.error("create_job", {"job": job})
    assert error["code"] == INVALID_PARAMS and why in error["message"], error
    assert store.loads == 0 and workers.runs == []


def test_bounds_on_jobs_scripts_and_timeouts():
    clock, workers, gateway, store = _server(max_jobs_per_caller=2, max_jobs=3, max_script_size=10, script_timeout=5)
    alice, bob = Connection(gateway, key=ALICE), Connection(gateway, key=BOB)
    big = alice.error("create_job", _job("x" * 11))
    assert big["code"] == TOO_MANY_REQUESTS and big["data"] == {"size": 11, "limit": 10}
    first = alice.result("create_job", _job(timeout=60))
    assert alice.result("get_job_status", [first])["timeout"] == 5  # never more than --script-timeout
    alice.result("create_job", _job())
    mine = alice.error("create_job", _job())
    assert mine["code"] == TOO_MANY_REQUESTS and mine["data"] == {"max_jobs_per_caller": 2}
    assert alice.error("run_job", {"script": "1", "script_type": "rhai"})["data"] == {"max_jobs_per_caller": 2}
    bob.result("create_job", _job())
    everyone = bob.error("create_job", _job())
    assert everyone["code"] == TOO_MANY_REQUESTS and everyone["data"] == {"max_jobs": 3}
    alice.result("delete_job", [first])
    bob.result("create_job", _job())  # room again


def test_jobs_expire_after_their_ttl():
    clock, workers, gateway, store = _server(job_ttl=100)
    alice = Connection(gateway, key=ALICE)
    old = alice.result("create_job", _job())
    clock.advance(50)
    young = alice.result("create_job", _job())
    clock.advance(50)
    assert alice.error("get_job_status", [old])["code"] == JOB_NOT_FOUND
    assert [job["job_id"] for job in alice.result("list_jobs")["jobs"]] == [young]
    dependent = alice.result("create_job", _job(prerequisites=[young]))
    clock.advance(50)
    status = alice.result("get_job_status", [dependent])
    assert status["status"] == ERROR and "no longer exists (deleted, or expired)" in status["error"]


def test_list_jobs_is_paged_and_bounded():
    clock, workers, gateway, store = _server()
    alice = Connection(gateway, key=ALICE)
    made = [alice.result("create_job", _job()) for _ in range(5)]
    page = alice.result("list_jobs", {"offset": 1, "limit": 2})
    assert page["total"] == 5 and [job["job_id"] for job in page["jobs"]] == made[1:3]
    assert alice.result("list_jobs", [4])["jobs"][0]["job_id"] == made[4]
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": 1.5}):
        assert alice.error("list_jobs", params)["code"] == INVALID_PARAMS, params
    assert alice.result("clear_all_jobs") == {"success": True, "deleted": 5}


def test_while_the_server_drains_no_job_is_made_or_started():
    clock, workers, gateway, store = _server()
    alice = Connection(gateway, key=ALICE)
    job_id = alice.result("create_job", _job())
    gateway.draining = True
    for method, params in (("create_job", _job()), ("start_job", [job_id]),
                           ("run_job", {"script": "1", "script_type": "rhai"})):
        error = alice.error(method, params)
        assert (error["code"], error["data"]) == (BACKEND_UNAVAILABLE, "the server is shutting down"), method
    assert alice.result("get_job_status", [job_id])["status"] == CREATED


def test_a_store_that_cannot_be_reached_is_backend_unavailable():
    from circles.backend.scripts import BackendUnavailable

    class Unreachable(MemoryJobStore):
        def load(self, caller):
            return fail(BackendUnavailable("Redis is unreachable"))

    clock, workers, gateway, store = _server()
    gateway.use_job_store(Unreachable(clock))
    alice = Connection(gateway, key=ALICE)
    error = alice.error("create_job", _job())
    assert (error["code"], error["data"]) == (BACKEND_UNAVAILABLE, "Redis is unreachable")
