"""Worker protocols of the ecosystem's own dispatchers, where a job is a hash and a queue holds
job ids: what such a protocol is (:class:`JobSchema`), and the Lua steps built from it.

Our own protocol (:mod:`circles.backend.tasks`) is one such design; the ecosystem's dispatchers
are others, with their own key names, field names and statuses. A :class:`JobSchema` says
those: the keys (:meth:`~JobSchema.job_key`, :meth:`~JobSchema.queue_key`,
:meth:`~JobSchema.stop_key`, :meth:`~JobSchema.reply_key`), the four statuses, the result
fields, how a job is written as a hash (:meth:`~JobSchema.job_fields`) and read back
(:meth:`~JobSchema.read_job`). The server's side (:mod:`circles.backend.job_dispatch`) and the
worker's (:mod:`circles.worker.job_worker`) work for any schema, with the steps of
:class:`JobSteps`. A schema is one small module (:mod:`circles.backend.hero`), named in
:mod:`circles.backend.worker_protocols`.

``docs/worker-protocol.md`` has each schema's keys and fields, what is documented upstream and
what we chose where it is silent.
"""

from __future__ import annotations

import datetime
import functools
import json

import attrs

#: The ``reason`` we add to an ``error`` result: the worker stopped the script at its timeout
#: (answered -32003, as our protocol's :data:`circles.backend.tasks.TIMED_OUT`), or a stop
#: request (or the dispatcher) stopped it.
TIMED_OUT = "timeout"
STOPPED = "stopped"


@attrs.frozen
class Job:
    """A job as our server writes it and our worker reads it, whatever the schema's names."""

    id: str
    circle: str  # the circle it runs in (the worker's queue, CONTEXT_ID)
    caller: str  # CALLER_ID: the authenticated key, "" when anonymous
    script: str
    timeout: float  # seconds; 0: none given
    source: str  # CIRCLES_SOURCE: "ws", "webhook:stripe", ... (a foreign dispatcher's: the schema's name)
    created_at: float = 0.0  # Unix seconds
    data: str | None = None  # CIRCLES_DATA: JSON text (a webhook event's body), if any


def iso_time(seconds: float) -> str:
    """Unix seconds as ISO 8601 in UTC, to the millisecond: ``2026-01-02T03:04:05.678Z``."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_iso_time(text: str) -> float | None:
    """Unix seconds from an ISO 8601 time (``Z`` or an offset; no zone: UTC); None if it is not one."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def json_array(text: str | None) -> list | None:
    """A field holding a JSON array of job ids, read; None when it is not one (absent, not JSON)."""
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, list) else None


class JobSchema:
    """A dispatcher's key schema. Subclasses set the names and write and read the hash.

    The four statuses are the life of a job: :attr:`queued` (written by the dispatcher, the id
    pushed on the worker's queue), :attr:`running` (a worker took it), then :attr:`finished`
    (with :attr:`output_field`) or :attr:`failed` (with :attr:`error_field`).
    """

    #: The name given to ``--worker-protocol``.
    name: str = ""
    queued = running = finished = failed = ""
    status_field = "status"
    output_field = "output"
    error_field = "error"
    updated_field = "updated_at"
    #: Our field beside the schema's: why an ``error`` ended the job (:data:`TIMED_OUT`,
    #: :data:`STOPPED`); a dispatcher that does not know it ignores it.
    reason_field = "reason"
    #: The fields dropped once the server has read a result (or stopped the job): what is large.
    bulky: tuple[str, ...] = ()
    #: Whether a job id of a stopped job goes on a stop queue (the schema has one).
    has_stop_queue = True

    def job_key(self, job_id: str) -> str:
        raise NotImplementedError

    def queue_key(self, circle: str) -> str:
        """The work queue of a circle's workers (the dispatcher pushes, workers pop)."""
        raise NotImplementedError

    def stop_key(self, circle: str) -> str:
        """The stop queue of a circle's workers (job ids to stop)."""
        raise NotImplementedError

    def reply_key(self, job_id: str) -> str:
        """The list a worker pushes to when it ended a job."""
        raise NotImplementedError

    def job_fields(self, job: Job) -> dict[str, str]:
        """The whole hash of a new job, status :attr:`queued`."""
        raise NotImplementedError

    def read_job(self, job_id: str, fields: dict[str, str]) -> Job:
        """A job from its hash as a dispatcher (ours or another) wrote it; missing fields are empty."""
        raise NotImplementedError

    @functools.cached_property
    def steps(self) -> JobSteps:
        return JobSteps(self)


def _lua(value: str) -> str:
    """``value`` as a Lua string literal."""
    return json.dumps(value)  # a JSON string of ASCII escapes is a valid Lua literal for these names


class JobSteps:
    """The Lua steps of a :class:`JobSchema`, each atomic in Redis, with its names written in.

    Server: :attr:`dispatch`, :attr:`dispatch_once` (webhooks), :attr:`take` (read a result
    once it is final, and drop what is large), :attr:`stop` (a play timed out or its caller
    left), :attr:`sweep` (which of many jobs ended). Worker: :attr:`start`, :attr:`finish`,
    :attr:`stop_request`, :attr:`statuses`.
    """

    def __init__(self, schema: JobSchema) -> None:
        names = {
            "STATUS": schema.status_field, "OUTPUT": schema.output_field, "ERROR": schema.error_field,
            "UPDATED": schema.updated_field, "REASON": schema.reason_field, "QUEUED": schema.queued,
            "RUNNING": schema.running, "FINISHED": schema.finished, "FAILED": schema.failed, "STOPPED": STOPPED,
        }
        lua = {name: _lua(value) for name, value in names.items()}
        lua["BULKY"] = ", ".join(_lua(field) for field in schema.bulky) or "nil"

        def step(text: str) -> str:
            for name, literal in lua.items():
                text = text.replace("@" + name, literal)
            return text

        # KEYS: job, queue. ARGV: ttl, job id, field, value, ... Writes the job and pushes its id.
        self.dispatch = step("""
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
return 1
""")
        # KEYS: seen, job, queue. ARGV: seen ttl, ttl, job id, field, value, ... As
        # circles.backend.tasks.ENQUEUE_ONCE, but the queue gets no TTL: it is the dispatcher's
        # and the workers' list, shared with other dispatchers, whose entries are not ours to expire.
        self.dispatch_once = step("""
if not redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', ARGV[1]) then
  return {0, redis.call('GET', KEYS[1])}
end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[3])
return {1, ARGV[3]}
""")
        # The result of a final job, and what is large dropped from its hash (kept ARGV[1] seconds
        # more) and its reply list deleted: the server read what it waited for.
        take_final = """
local function take(job, reply, ttl)
  local f = redis.call('HMGET', job, @STATUS, @OUTPUT, @ERROR, @REASON)
  if f[1] == @FINISHED or f[1] == @FAILED then
    local bulky = {@BULKY}
    if #bulky > 0 then redis.call('HDEL', job, unpack(bulky)) end
    redis.call('EXPIRE', job, ttl)
    redis.call('DEL', reply)
  end
  return {f[1] or 'missing', f[2], f[3], f[4] or ''}
end
"""
        # KEYS: job, reply list. ARGV: status ttl. Returns {status ('missing': no hash), output,
        # error, reason}; output and error are nil when absent. Takes the result only if final.
        self.take = step(take_final + "return take(KEYS[1], KEYS[2], ARGV[1])\n")
        # KEYS: job, queue, stop queue, reply list. ARGV: now, job id, status ttl, stop ttl,
        # why. A job not final is stopped: failed (reason 'stopped', ``why`` its error), what is
        # large dropped; its id taken off the queue if no worker took it yet, else pushed on the
        # stop queue (which lives ``stop ttl`` seconds). Returns {'stopped', ...}; a final job's
        # result as take() does (it ended just before); {'missing', ...} if the hash is gone.
        self.stop = step(take_final + """
local status = redis.call('HGET', KEYS[1], @STATUS)
if not status then return {'missing', false, false, ''} end
if status ~= @QUEUED and status ~= @RUNNING then return take(KEYS[1], KEYS[4], ARGV[3]) end
local bulky = {@BULKY}
if #bulky > 0 then redis.call('HDEL', KEYS[1], unpack(bulky)) end
redis.call('HSET', KEYS[1], @STATUS, @FAILED, @ERROR, ARGV[5], @UPDATED, ARGV[1], @REASON, @STOPPED)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if redis.call('LREM', KEYS[2], 0, ARGV[2]) == 0 and KEYS[3] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return {'stopped', false, false, ''}
""")
        # KEYS: jobs. Returns the indexes (1-based) of those that ended (final) or are gone.
        self.sweep = step("""
local ended = {}
for i, job in ipairs(KEYS) do
  local status = redis.call('HGET', job, @STATUS)
  if not status or status == @FINISHED or status == @FAILED then ended[#ended + 1] = i end
end
return ended
""")
        # Worker. KEYS: job. ARGV: now. A job taken from the queue: queued -> running, its fields
        # returned; nil (skip it) if it is anything else (stopped, gone, taken by another).
        self.start = step("""
if redis.call('HGET', KEYS[1], @STATUS) ~= @QUEUED then return false end
redis.call('HSET', KEYS[1], @STATUS, @RUNNING, @UPDATED, ARGV[1])
return redis.call('HGETALL', KEYS[1])
""")
        # Worker. KEYS: job, reply list. ARGV: status, output, error, reason, now, job id, ttl.
        # Writes the result only over running (a job stopped meanwhile keeps its stop), keeps the
        # hash ``ttl`` seconds, and pushes the job id on the reply list (which lives as long).
        # Returns 1 if written, else 0.
        self.finish = step("""
if redis.call('HGET', KEYS[1], @STATUS) ~= @RUNNING then return 0 end
redis.call('HSET', KEYS[1], @STATUS, ARGV[1], @OUTPUT, ARGV[2], @ERROR, ARGV[3], @UPDATED, ARGV[5])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], @REASON, ARGV[4]) end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('LPUSH', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return 1
""")
        # Worker, a stop request read. KEYS: job, reply list. ARGV: now, why, job id, ttl. A job
        # not final fails (reason 'stopped'), and its reply is pushed: whichever worker runs it
        # sees it is no longer running. Returns 1 if it was stopped, 0 if it had ended (or is gone).
        self.stop_request = step("""
local status = redis.call('HGET', KEYS[1], @STATUS)
if status ~= @QUEUED and status ~= @RUNNING then return 0 end
redis.call('HSET', KEYS[1], @STATUS, @FAILED, @ERROR, ARGV[2], @UPDATED, ARGV[1], @REASON, @STOPPED)
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
""")
        # Worker. KEYS: the jobs it runs. Returns their statuses ('' for a hash gone).
        self.statuses = step("""
local out = {}
for i, job in ipairs(KEYS) do out[i] = redis.call('HGET', job, @STATUS) or '' end
return out
""")
