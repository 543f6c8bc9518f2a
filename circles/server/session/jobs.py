"""The jobs methods of the hero contract (:mod:`circles.server.session.contracts.hero`): scripts a
caller creates now, starts later and reads back afterwards, as hero's clients call them.

``create_job`` · ``start_job`` · ``run_job`` · ``get_job_status`` · ``get_job_output`` ·
``get_job_logs`` · ``list_jobs`` · ``stop_job`` · ``delete_job`` · ``clear_all_jobs``

The rules (what the contract's document says to clients):

- Jobs belong to the key that created them, in the circle of the connection that created them.
  Every jobs method needs an authenticated connection (-32001 before), whatever ``--auth``; only
  that key, on a connection to that circle, sees, starts, stops or deletes its jobs. A job of
  another key or another circle is "Job not found" (-32010), as is a job that never existed, was
  deleted or expired: ids do not leak.
- A job's ``caller_id`` and ``context_id`` may be left out (they are the authenticated key and the
  connection's circle); given, they must be those (either key form), else -32602.
- ``script_type`` is ``rhai`` (any case): the workers run Rhai. Another is -32602.
- Ids are UUIDs the server chose; a ``job_id`` that has not their form is -32602, looked up nowhere.
- A job's prerequisites are jobs of the same key and circle that exist when it is made (at most
  16); so they are always older than it, and no cycle can form. A started job waits
  (``dispatched``) until they have all ``finished``; one that ended in error or was stopped, or is
  gone, ends it in ``error`` at once, naming it.
- Bounds: ``--max-jobs-per-caller`` live jobs per key and ``--max-jobs`` in all (-32006 past
  them), ``--max-running-jobs-per-caller`` running at once (the others started wait their turn),
  a script within ``--max-script-size``, a run within ``--script-timeout``; a job lives
  ``--job-ttl`` seconds from its creation, then it is gone.
- A job runs on when the connection that created or started it closes; its outcome is kept.
  ``run_job`` is create, start and wait: its job is deleted once its output is answered; if the
  connection closes first, the job runs on and stays (``list_jobs`` shows it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred

from circles.backend.members import MEMBERS
from circles.backend.scripts import BackendFull, BackendUnavailable, ScriptFailed
from circles.common.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, Methods, Param, RPCError
from circles.common.keys import InvalidKey, normalize_pubkey
from circles.common.wire import (
    BACKEND_UNAVAILABLE,
    JOB_NOT_FOUND,
    JOB_STATE,
    NO_WORKER,
    NOT_A_MEMBER,
    SCRIPT_TIMEOUT,
    TOO_MANY_REQUESTS,
)
from circles.server.jobs import model
from circles.server.jobs.model import (
    ENDED,
    ERROR,
    FINISHED,
    MAX_PREREQUISITES,
    SCRIPT_TYPES,
    Job,
    JobNotFound,
    PrerequisiteNotFound,
    Table,
    TooManyJobs,
    WrongState,
    is_job_id,
    new_job_id,
)
from circles.server.session.methods import Session, capped_timeout, check_script

#: The jobs methods, which the hero contract's method table adds to ours.
job_methods = Methods()

#: The fields a job (create_job's ``job``) may have.
JOB_FIELDS = ("caller_id", "context_id", "script", "script_type", "timeout", "prerequisites")
#: Jobs one list_jobs answers at most (its ``limit``'s default and bound).
LIST_LIMIT = 100

_JOB_ID = Param("job_id", (str,))


# --- what every jobs method checks -------------------------------------------------------------

def _caller(session: Session) -> str:
    """The authenticated key: jobs are its (-32001 on a connection that has not authenticated)."""
    if session.pubkey is None:
        raise session.contract.auth_required()
    return session.pubkey


def _job_id(value: str, name: str = "job_id") -> str:
    if not is_job_id(value):
        raise RPCError(INVALID_PARAMS, f"Invalid params: '{name}' is not a job id (a UUID that create_job answered)")
    return value


def _accepting(session: Session) -> None:
    if session.gateway.draining:
        raise RPCError(BACKEND_UNAVAILABLE, "Script backend unavailable", "the server is shutting down")


def _answer(work: Coroutine) -> Deferred:
    """The method's Deferred: its coroutine, with what it raises said as the contract's errors."""
    return ensureDeferred(_said(work))


async def _said(work: Coroutine) -> Any:
    try:
        return await work
    except PrerequisiteNotFound as e:
        raise RPCError(INVALID_PARAMS, f"Invalid params: prerequisite {e.job_id} is no job of this key in this "
                       "circle") from None
    except JobNotFound as e:
        raise RPCError(JOB_NOT_FOUND, "Job not found", f"no job {e.job_id} of this key in this circle (never made, "
                       "deleted, or expired)") from None
    except WrongState as e:
        raise RPCError(JOB_STATE, f"Job state does not allow it: {e.why}",
                       {"job_id": e.job.id, "status": e.job.status}) from None
    except TooManyJobs as e:
        if e.of == "caller":
            raise RPCError(TOO_MANY_REQUESTS, f"Too many requests: this key has {e.limit} live jobs, the server's "
                           "limit (--max-jobs-per-caller): delete some (delete_job, clear_all_jobs), or let them "
                           "expire", {"max_jobs_per_caller": e.limit}) from None
        raise RPCError(TOO_MANY_REQUESTS, f"Too many requests: the server holds {e.limit} live jobs, its limit "
                       "(--max-jobs): retry later", {"max_jobs": e.limit}) from None
    except BackendFull as e:
        raise RPCError(BACKEND_UNAVAILABLE, "Script backend unavailable: Redis is full (maxmemory)", str(e)) from None
    except BackendUnavailable as e:
        raise RPCError(BACKEND_UNAVAILABLE, "Script backend unavailable", str(e)) from None


async def _change(session: Session, operation: Callable[[Table], Any]) -> tuple[Any, Table]:
    return await session.gateway.jobs.change(_caller(session), operation)


async def _owned(session: Session, job_id: str) -> tuple[Job, Table]:
    """The caller's job ``job_id`` in this circle, and its table (a look: what follows from the
    table is applied, as by any change)."""
    job, table = await _change(session, lambda table: table.owned(session.circle, job_id))
    return table.jobs[job.id], table  # as the change left it


# --- a job's description -------------------------------------------------------------------

def _time(seconds: float | None) -> str | None:
    """ISO 8601, UTC, to the millisecond: ``2026-12-07T10:00:00.000Z``."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_status(job: Job, table: Table) -> dict:
    """A job as get_job_status and list_jobs answer it (the document's JobStatus)."""
    return {"job_id": job.id, "caller_id": job.caller, "context_id": job.circle, "script_type": job.script_type,
            "timeout": job.timeout, "status": job.status, "prerequisites": list(job.prerequisites),
            "dependents": table.dependents(job), "created_at": _time(job.created_at),
            "updated_at": _time(job.updated_at), "started_at": _time(job.started_at),
            "ended_at": _time(job.ended_at), "expires_at": _time(job.expires_at), "error": job.error}


async def _output(session: Session, job: Job) -> str:
    """What a finished job printed; for any other, the error that says why there is none."""
    output = await session.gateway.jobs.store.read(job.id, "output") if job.status in ENDED else None
    if job.status == FINISHED:
        return output or ""
    if job.status == ERROR:
        error = job.error or ""
        if job.why == model.FAILED:  # the script failed: as play answers it, on this contract
            raise session.contract.script_failed(ScriptFailed(error, output or ""))
        if job.why == model.TIMED_OUT:
            raise RPCError(SCRIPT_TIMEOUT, "Script timed out", error)
        if job.why == model.NO_WORKER:
            raise RPCError(NO_WORKER, "No worker is serving this circle", error)
        if job.why == model.UNAVAILABLE:
            raise RPCError(BACKEND_UNAVAILABLE, "Script backend unavailable", error)
        if job.why == model.NOT_A_MEMBER:
            raise RPCError(NOT_A_MEMBER, "Not a member of this circle", error)
        if job.why not in (model.PREREQUISITE, model.LOST):
            raise RPCError(INTERNAL_ERROR, "Internal error")
        why = f"it ended in error, without running: {error}" if job.why == model.PREREQUISITE else \
            f"it ended in error: {error}"
    elif job.status == model.STOPPED:
        why = "it was stopped (stop_job): it has no output"
    else:
        why = f"it has not ended: it is {job.status}"
    raise RPCError(JOB_STATE, f"Job state does not allow it: {why}", {"job_id": job.id, "status": job.status})


# --- a new job -----------------------------------------------------------------------------

def _spec(session: Session, caller: str, script: Any, script_type: Any, timeout: Any = None,
          prerequisites: Any = None, caller_id: Any = None, context_id: Any = None, where: str = "") -> dict:
    """The checked fields of a new job (-32602 for any that is wrong; ``where`` names the object
    they are in, for the message)."""
    def name(field: str) -> str:
        return f"{where}.{field}" if where else field

    def invalid(message: str) -> RPCError:
        return RPCError(INVALID_PARAMS, f"Invalid params: {message}")

    for field, value, kinds in (("script", script, (str,)), ("script_type", script_type, (str,))):
        Param(name(field), kinds).check(value)
    if script_type.lower() not in SCRIPT_TYPES:
        raise invalid(f"'{name('script_type')}' {script_type[:40]!r} is not one this server runs: "
                      f"{', '.join(SCRIPT_TYPES)}")
    check_script(session.gateway, script, name("script"))
    if timeout is not None:
        Param(name("timeout"), (int, float)).check(timeout)
    limit = capped_timeout(session.gateway, timeout, name("timeout"))
    if prerequisites is None:
        prerequisites = []
    Param(name("prerequisites"), (list,)).check(prerequisites)
    if len(prerequisites) > MAX_PREREQUISITES:
        raise invalid(f"'{name('prerequisites')}' names {len(prerequisites)} jobs, more than {MAX_PREREQUISITES}")
    for value in prerequisites:
        _job_id(value, name("prerequisites"))
    for field, value, must_be, what in (("caller_id", caller_id, caller, "the authenticated key"),
                                        ("context_id", context_id, session.circle, "this connection's circle")):
        if value is None:
            continue
        try:
            given = normalize_pubkey(Param(name(field), (str,)).check(value))
        except InvalidKey as e:
            raise invalid(f"'{name(field)}': {e}") from None
        if given != must_be:
            raise invalid(f"'{name(field)}' must be {what}, {must_be}: a job is made by the key that "
                          "authenticated, in the circle of its connection")
    return {"script": script, "script_type": script_type.lower(), "timeout": limit, "prerequisites": prerequisites}


async def _create(session: Session, caller: str, spec: dict, start: bool) -> tuple[Job, Table]:
    gateway = session.gateway
    if gateway.members is not None:
        # The circle's policy is asked before anything is kept: a key that may not play here makes no job.
        verdict = await gateway.members.check(session.circle, caller)
        if not verdict.allowed:
            raise RPCError(NOT_A_MEMBER, "Not a member of this circle",
                           "this circle admits its members only, and the authenticated key is not one"
                           if verdict.policy == MEMBERS else
                           "this circle's policy is neither open nor members: every play is refused")
    limits = gateway.jobs.limits
    return await _change(session, functools.partial(
        model.create, job_id=new_job_id(), caller=caller, circle=session.circle, ttl=limits.ttl,
        most=limits.per_caller, start=start, **spec))


@job_methods.add("create_job", Param("job", (dict,)))
def create_job(session: Session, job: dict) -> Deferred:
    caller = _caller(session)
    unknown = sorted(job.keys() - set(JOB_FIELDS))
    if unknown:
        raise RPCError(INVALID_PARAMS, f"Invalid params: unknown field 'job.{unknown[0]}' (a job has "
                       f"{', '.join(JOB_FIELDS)})")
    for field in ("script", "script_type"):
        if field not in job:
            raise RPCError(INVALID_PARAMS, f"Invalid params: 'job.{field}' is required")
    spec = _spec(session, caller, where="job", **job)
    _accepting(session)
    return _answer(_create_job(session, caller, spec))


async def _create_job(session: Session, caller: str, spec: dict) -> str:
    job, _ = await _create(session, caller, spec, start=False)
    return job.id


@job_methods.add("run_job", Param("script", (str,)), Param("script_type", (str,)),
                 Param("prerequisites", (list,), required=False), Param("timeout", (int, float), required=False))
def run_job(session: Session, script: str, script_type: str, prerequisites: list | None = None,
            timeout: float | None = None) -> Deferred:
    caller = _caller(session)
    spec = _spec(session, caller, script, script_type, timeout, prerequisites)
    _accepting(session)
    most = session.gateway.config.max_plays
    if most and len(session.plays) >= most:
        raise RPCError(TOO_MANY_REQUESTS, f"Too many requests: {most} plays already wait on this connection",
                       {"max_plays": most})
    d = _answer(_run_job(session, caller, spec))
    # Counted with the connection's plays, and no longer waited for when it closes: the job runs on.
    session.hold(d)
    d.addBoth(_settled, session, d)
    return d


def _settled(result, session: Session, d: Deferred):
    session.release(d)
    return result


async def _run_job(session: Session, caller: str, spec: dict) -> str:
    job, table = await _create(session, caller, spec, start=True)
    jobs = session.gateway.jobs
    ended = await jobs.wait(job, table.version)
    try:
        return await _output(session, ended)
    finally:
        try:  # answered: the job has done its part
            await jobs.change(caller, lambda table: model.delete(table, session.circle, job.id))
        except (JobNotFound, BackendUnavailable):
            pass  # gone already, or left to expire


# --- one job ---------------------------------------------------------------------------------

@job_methods.add("start_job", _JOB_ID)
def start_job(session: Session, job_id: str) -> Deferred:
    _caller(session)
    _job_id(job_id)
    _accepting(session)
    return _answer(_succeed(session, lambda table: model.start(table, session.circle, job_id)))


async def _succeed(session: Session, operation: Callable[[Table], Any]) -> dict:
    await _change(session, operation)
    return {"success": True}


@job_methods.add("stop_job", _JOB_ID)
def stop_job(session: Session, job_id: str) -> Deferred:
    _caller(session)
    _job_id(job_id)
    return _answer(_succeed(session, lambda table: model.stop(table, session.circle, job_id)))


@job_methods.add("delete_job", _JOB_ID)
def delete_job(session: Session, job_id: str) -> Deferred:
    _caller(session)
    _job_id(job_id)
    return _answer(_succeed(session, lambda table: model.delete(table, session.circle, job_id)))


@job_methods.add("get_job_status", _JOB_ID)
def get_job_status(session: Session, job_id: str) -> Deferred:
    _caller(session)
    _job_id(job_id)
    return _answer(_get_job_status(session, job_id))


async def _get_job_status(session: Session, job_id: str) -> dict:
    job, table = await _owned(session, job_id)
    return job_status(job, table)


@job_methods.add("get_job_output", _JOB_ID)
def get_job_output(session: Session, job_id: str) -> Deferred:
    _caller(session)
    _job_id(job_id)
    return _answer(_get_job_output(session, job_id))


async def _get_job_output(session: Session, job_id: str) -> str:
    job, _ = await _owned(session, job_id)
    return await _output(session, job)


@job_methods.add("get_job_logs", _JOB_ID)
def get_job_logs(session: Session, job_id: str) -> Deferred:
    _caller(session)
    _job_id(job_id)
    return _answer(_get_job_logs(session, job_id))


async def _get_job_logs(session: Session, job_id: str) -> list[str]:
    job, _ = await _owned(session, job_id)
    if job.status not in ENDED:
        return []  # the workers answer what a script printed when it ends
    output = await session.gateway.jobs.store.read(job.id, "output")
    lines = output.splitlines() if output else []
    if job.error is not None:
        lines.append(f"error: {job.error}" if job.status == ERROR else job.error)
    return lines


# --- every job of the caller in this circle ------------------------------------------------

@job_methods.add("list_jobs", Param("offset", (int,), required=False), Param("limit", (int,), required=False))
def list_jobs(session: Session, offset: int = 0, limit: int = LIST_LIMIT) -> Deferred:
    _caller(session)
    if offset < 0:
        raise RPCError(INVALID_PARAMS, "Invalid params: 'offset' must be 0 or more")
    if not 1 <= limit <= LIST_LIMIT:
        raise RPCError(INVALID_PARAMS, f"Invalid params: 'limit' must be from 1 to {LIST_LIMIT}")
    return _answer(_list_jobs(session, offset, limit))


async def _list_jobs(session: Session, offset: int, limit: int) -> dict:
    _, table = await _change(session, lambda table: None)
    jobs = table.ordered(session.circle)
    return {"jobs": [job_status(job, table) for job in jobs[offset:offset + limit]], "total": len(jobs)}


@job_methods.add("clear_all_jobs")
def clear_all_jobs(session: Session) -> Deferred:
    _caller(session)
    return _answer(_clear_all_jobs(session))


async def _clear_all_jobs(session: Session) -> dict:
    cleared, _ = await _change(session, lambda table: model.clear(table, session.circle))
    return {"success": True, "deleted": len(cleared)}


# --- the document ----------------------------------------------------------------------------

def _ref(name: str) -> dict:
    return {"$ref": f"#/components/errors/{name}"}


def _schema(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


#: Every jobs method may answer these (a connection's limits, the store, authentication).
_ALWAYS = ("InvalidParams", "AuthenticationRequired", "BackendUnavailable", "TooManyRequests", "ReplyTooLarge")
#: The errors of a job that has no output (get_job_output, run_job): as play answers a failed script, and -32011.
_NO_OUTPUT = ("ScriptFailed", "ScriptTimeout", "NoWorker", "NotAMember", "JobState")
_SUCCESS = {"name": "success", "schema": {"type": "object", "required": ["success"],
                                          "properties": {"success": {"const": True}}}}
_JOB_ID_PARAM = {"name": "job_id", "required": True, "description": "A job's id, as create_job answered it.",
                 "schema": _schema("JobId")}


def _method(name: str, summary: str, description: str, params: list, result: dict, errors: tuple) -> dict:
    return {"name": name, "summary": summary, "description": description, "paramStructure": "either",
            "params": params, "result": result, "errors": [_ref(e) for e in dict.fromkeys(errors + _ALWAYS)]}


def document(doc: dict) -> None:
    """Add the jobs methods, their schemas and their two error codes to an OpenRPC document
    (the hero contract's: :func:`circles.server.session.contracts.hero.document_changes`)."""
    statuses = ", ".join(model.STATUSES)
    components = doc["components"]
    components["schemas"]["JobId"] = {
        "type": "string", "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
        "description": "A job's id: a random UUID (version 4, lowercase) that the server chose. One of any other "
                       "form is refused (-32602) without being looked up."}
    components["schemas"]["Job"] = {
        "type": "object", "required": ["script", "script_type"], "additionalProperties": False,
        "description": "A new job (hero's JobParams, as this server takes it). The fields hero's minimal job has "
                       "(caller_id, context_id, script, script_type, timeout), and its prerequisites.",
        "properties": {
            "caller_id": {**_schema("PublicKey"), "description": "The authenticated key (either form), or left out: "
                          "a job is made by the key that authenticated. Another key is -32602."},
            "context_id": {**_schema("PublicKey"), "description": "This connection's circle (either form), or left "
                           "out: a job runs in the circle of the connection that made it. Another is -32602."},
            "script": {"type": "string", "description": "The script, at most --max-script-size bytes once encoded "
                       "as UTF-8 (65536 by default; -32006 past it)."},
            "script_type": {"type": "string", "description": f"The script's language: {', '.join(SCRIPT_TYPES)} "
                            "(any case), what the workers run; another is -32602."},
            "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "Seconds its run may take; at most "
                        "the server's --script-timeout (a larger one is lowered to it), which it is when left out."},
            "prerequisites": {"type": "array", "maxItems": MAX_PREREQUISITES, "items": _schema("JobId"),
                              "description": "Jobs of the same key in the same circle that must finish before this "
                              "one runs (they must exist: -32602 otherwise). If one ends in error, is stopped or "
                              "is gone, this job ends in error at once, naming it."}}}
    components["schemas"]["JobStatus"] = {
        "type": "object", "description": "A job as the server keeps it (hero's JobStatus, as this server answers it).",
        "required": ["job_id", "caller_id", "context_id", "script_type", "timeout", "status", "prerequisites",
                     "dependents", "created_at", "updated_at", "started_at", "ended_at", "expires_at", "error"],
        "properties": {
            "job_id": _schema("JobId"),
            "caller_id": {"type": "string", "description": "The key that made it, compressed hex."},
            "context_id": {"type": "string", "description": "The circle it runs in, compressed hex."},
            "script_type": {"type": "string"},
            "timeout": {"type": "number", "description": "Seconds its run may take."},
            "status": {"enum": list(model.STATUSES), "description":
                       "created: made, not asked to run. dispatched: start_job (or run_job) asked for it; it waits "
                       "until its prerequisites have finished and fewer than --max-running-jobs-per-caller jobs of "
                       "its key run. started: handed to the circle's workers. finished: it ran; get_job_output "
                       "answers its output. error: it failed, timed out, could not run, or its run was lost "
                       "(error says which). stopped: stop_job stopped it."},
            "prerequisites": {"type": "array", "items": _schema("JobId")},
            "dependents": {"type": "array", "items": _schema("JobId"),
                           "description": "The jobs that name this one as a prerequisite, oldest first."},
            "created_at": {"type": "string", "format": "date-time", "description": "ISO 8601, UTC."},
            "updated_at": {"type": "string", "format": "date-time", "description": "When its status last changed."},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "ended_at": {"type": ["string", "null"], "format": "date-time",
                         "description": "When it finished, failed or was stopped."},
            "expires_at": {"type": "string", "format": "date-time", "description": "When it is gone: --job-ttl "
                           "seconds after its creation, whatever its status."},
            "error": {"type": ["string", "null"], "description": f"Why it ended in error or was stopped (its first "
                      f"{model.MAX_ERROR} characters); null otherwise."}}}
    errors = components["errors"]
    errors["JobNotFound"] = {"code": JOB_NOT_FOUND, "message": "Job not found",
                             "data": "No job of the authenticated key in this circle has that id: it never existed, "
                                     "is another key's or another circle's, was deleted, or expired. The same for "
                                     "all, so that ids do not leak."}
    errors["JobState"] = {"code": JOB_STATE, "message": "Job state does not allow it",
                          "data": "{job_id, status}; the message says why: start_job on a job that is not created, "
                                  "stop_job on one that has ended, the output of one that has not finished (or "
                                  "ended in error without running: a prerequisite failed; or was stopped)."}
    owned = ("JobNotFound",)
    methods = [
        _method("create_job", "Make a job, without starting it: its id.",
                "The job belongs to the authenticated key, in this connection's circle: only that key, on a "
                "connection to that circle, sees, starts, stops or deletes it. Needs authentication, whatever --auth. "
                "A circle whose policy is members refuses other keys (-32009). A key may have at most "
                "--max-jobs-per-caller live jobs (100 by default), the server --max-jobs (1000): -32006 past them "
                "(delete_job, clear_all_jobs, or their expiry make room). A job lives --job-ttl seconds (a day by "
                "default) from now, then it is gone with its output.",
                [{"name": "job", "required": True, "schema": _schema("Job")}],
                {"name": "job_id", "schema": _schema("JobId")}, ("NotAMember",)),
        _method("start_job", "Ask a created job to run.",
                "It becomes dispatched, and runs once its prerequisites have all finished and fewer than "
                "--max-running-jobs-per-caller (4 by default) jobs of its key run; if a prerequisite ended in error, "
                "was stopped or is gone, it ends in error at once. It runs on the circle's workers as a play of its "
                "key (the circle's policy is asked again), and runs on if this connection closes: its outcome is "
                "kept for get_job_status, get_job_output and get_job_logs.",
                [_JOB_ID_PARAM], _SUCCESS, owned + ("JobState",)),
        _method("run_job", "Make a job, start it, and answer its output once it has ended.",
                "create_job and start_job in one, then waiting for its end: its output, or the error that says why "
                "there is none (as get_job_output answers). Once answered, the job is deleted. If the connection "
                "closes first, the job runs on and stays (list_jobs shows it) until deleted or expired. Counted "
                "with the connection's plays (--max-plays).",
                [{"name": "script", "required": True, "schema": {"type": "string"},
                  "description": "As a job's script."},
                 {"name": "script_type", "required": True, "schema": {"type": "string"},
                  "description": "As a job's script_type: rhai."},
                 {"name": "prerequisites", "required": False, "schema": {"type": "array", "items": _schema("JobId"),
                                                                         "maxItems": MAX_PREREQUISITES},
                  "description": "As a job's prerequisites."},
                 {"name": "timeout", "required": False, "schema": {"type": "number", "exclusiveMinimum": 0},
                  "description": "As a job's timeout."}],
                {"name": "output", "schema": {"type": "string", "description": "What the script printed and returned, "
                                              "as play's output."}},
                ("NotAMember", "JobNotFound") + _NO_OUTPUT),
        _method("get_job_status", "A job's status, and what is known of it.",
                f"Statuses: {statuses}.", [_JOB_ID_PARAM], {"name": "status", "schema": _schema("JobStatus")}, owned),
        _method("get_job_output", "What a finished job's script printed and returned.",
                "A job that ended in error answers the error its run would have answered as play (the script "
                "failed: -32005 with its output; timed out: -32003; no worker: -32008; not a member: -32009; Redis: "
                "-32004); one that did not run (a prerequisite failed), was stopped, or has not ended: -32011.",
                [_JOB_ID_PARAM], {"name": "output", "schema": {"type": "string"}}, owned + _NO_OUTPUT),
        _method("get_job_logs", "A job's log: the lines its script printed, then its error.",
                "Empty until the job has ended (the workers answer what a script printed when it ends). Then the "
                "lines of its output, and a last line with its error (\"error: ...\") if it ended in error, or why it "
                "was stopped.",
                [_JOB_ID_PARAM], {"name": "logs", "schema": {"type": "array", "items": {"type": "string"}}}, owned),
        _method("list_jobs", "The authenticated key's jobs in this circle, oldest first, a page at a time.",
                f"At most {LIST_LIMIT} per answer: offset and limit choose the page; total is how many there are.",
                [{"name": "offset", "required": False, "schema": {"type": "integer", "minimum": 0},
                  "description": "Jobs to skip (0 by default)."},
                 {"name": "limit", "required": False, "schema": {"type": "integer", "minimum": 1,
                                                                 "maximum": LIST_LIMIT},
                  "description": f"Jobs to answer at most ({LIST_LIMIT} by default)."}],
                {"name": "jobs", "schema": {"type": "object", "required": ["jobs", "total"], "properties": {
                    "jobs": {"type": "array", "items": _schema("JobStatus")},
                    "total": {"type": "integer", "minimum": 0}}}}, ()),
        _method("stop_job", "Stop a job that has not ended.",
                "It becomes stopped: if it runs, its run is stopped (its task expired, wherever the server process "
                "running it is); if it waits, it never runs. Its dependents that have not run end in error. A job "
                "that has ended: -32011.",
                [_JOB_ID_PARAM], _SUCCESS, owned + ("JobState",)),
        _method("delete_job", "Delete a job, whatever its status.",
                "A running job's run is stopped first. Its dependents that have not run end in error (their "
                "prerequisite is gone).",
                [_JOB_ID_PARAM], _SUCCESS, owned),
        _method("clear_all_jobs", "Delete every job of the authenticated key in this circle.",
                "As delete_job, for each; other keys' jobs, and this key's in other circles, stay.",
                [], {"name": "cleared", "schema": {"type": "object", "required": ["success", "deleted"], "properties": {
                    "success": {"const": True}, "deleted": {"type": "integer", "minimum": 0,
                                                            "description": "How many jobs were deleted."}}}}, ()),
    ]
    doc["methods"] = [m for m in doc["methods"] if m["name"] != "rpc.discover"] + methods + \
        [m for m in doc["methods"] if m["name"] == "rpc.discover"]
