"""The task protocol between servers and workers, in one place both sides import.

``docs/worker-protocol.md`` is the written form of what is here (keys, fields, statuses, the
reply, TTLs); keep the two in step. Every step that must not be seen half-done by the other
side is one Lua script, so it is atomic in Redis:

- ``ENQUEUE`` (server): write the task hash and LPUSH its id on the circle's queue.
- ``ENQUEUE_ONCE`` (server, webhooks): the same, only if a "seen" key for the event can be
  claimed (``SET NX``) in the same step; a redelivered event gets the first task's id instead.
- ``CLAIM`` (worker): ``pending`` -> ``processing``; anything else (``expired``, gone) is skipped.
- ``FINISH`` (worker): ``processing`` -> ``completed``|``error`` and LPUSH the reply, unless the
  server expired the task meanwhile.
- ``EXPIRE`` (server, on timeout): ``pending``|``processing`` -> ``expired``; if the worker
  finished first, the result is returned instead.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import attrs

DEFAULT_PREFIX = "circles:"

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
ERROR = "error"
EXPIRED = "expired"

#: The ``reason`` of an ``error`` result when the worker stopped the script at its own timeout:
#: the server answers it as a timeout (-32003), like its own deadline, not as a failure.
TIMED_OUT = "timeout"

#: Seconds a task hash (and a queue or reply list) lives after its last change; a pending
#: task lives this long past its deadline.
TASK_TTL = 300


def task_key(prefix: str, task_id: str) -> str:
    return f"{prefix}task:{task_id}"


def queue_key(prefix: str, circle: str) -> str:
    return f"{prefix}queue:{circle}"


def reply_key(prefix: str, server_id: str) -> str:
    return f"{prefix}reply:{server_id}"


def seen_key(prefix: str, name: str) -> str:
    """The key that marks an event (``name``, e.g. ``stripe:{circle}:{digest}``) as queued."""
    return f"{prefix}seen:{name}"


def timestamp(seconds: float) -> str:
    """Unix seconds as written in task fields: decimal, millisecond precision."""
    return f"{seconds:.3f}"


# KEYS: task, queue. ARGV: ttl, task id, field, value, field, value...
# The queue's TTL is only ever extended: a short-lived play must not shorten the life of a
# queue holding a long-lived webhook task.
ENQUEUE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return 1
"""

# KEYS: seen, task, queue. ARGV: seen ttl, task ttl, task id, field, value, field, value...
# Returns {1, task id} when queued, {0, first task id} when the event was seen before. Claiming
# the seen key and queuing are one step: a crash cannot leave an event marked but not queued,
# nor queued twice. The seen key is the first write, so a Redis refusing writes (OOM) fails the
# whole step before anything changed.
ENQUEUE_ONCE = """
if not redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', ARGV[1]) then
  return {0, redis.call('GET', KEYS[1])}
end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('LPUSH', KEYS[3], ARGV[3])
if redis.call('TTL', KEYS[3]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[3], ARGV[2]) end
return {1, ARGV[3]}
"""

# KEYS: task. ARGV: now, worker id. Returns the task's fields (HGETALL), or nil: skip it.
CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return false end
redis.call('HSET', KEYS[1], 'status', 'processing', 'updated_at', ARGV[1], 'worker', ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: task [, reply list]. ARGV: status, output, error, now, ttl, reply, reason.
# Returns 1 if written, 0 if the task was no longer ours (expired or gone).
FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'output', ARGV[2], 'error', ARGV[3], 'updated_at', ARGV[4],
           'reason', ARGV[7] or '')
redis.call('EXPIRE', KEYS[1], ARGV[5])
if KEYS[2] then
  redis.call('LPUSH', KEYS[2], ARGV[6])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return 1
"""

# KEYS: task. ARGV: now, ttl. Returns {status, output, error, reason}: 'expired' if this call
# expired it, the final status if a worker got there first, 'missing' if the hash is gone.
# An expired task's script is dropped: no worker will run it, and a client that queued large
# scripts and hung up must not leave them in Redis for another TTL.
EXPIRE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', '', '', ''} end
if status == 'pending' or status == 'processing' then
  redis.call('HSET', KEYS[1], 'status', 'expired', 'updated_at', ARGV[1])
  redis.call('HDEL', KEYS[1], 'script')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'expired', '', '', ''}
end
local fields = redis.call('HMGET', KEYS[1], 'output', 'error', 'reason')
return {status, fields[1] or '', fields[2] or '', fields[3] or ''}
"""


@attrs.frozen
class Outcome:
    """How a task ended, as a reply or the task hash tells it."""

    task_id: str
    status: str
    output: str = ""
    error: str = ""
    reason: str = ""  # why an ``error`` ended it, when the protocol names it (TIMED_OUT); else ""

    @property
    def timed_out(self) -> bool:
        """The worker stopped the script at its timeout: the same condition as the server's deadline."""
        return self.status == ERROR and self.reason == TIMED_OUT


class MalformedReply(ValueError):
    """A reply list entry that is neither a task id nor a reply object."""


def encode_reply(outcome: Outcome) -> str:
    reply = {"task_id": outcome.task_id, "status": outcome.status, "output": outcome.output, "error": outcome.error}
    if outcome.reason:
        reply["reason"] = outcome.reason  # only when there is one; servers that predate it ignore it
    return json.dumps(reply, separators=(",", ":"))


def decode_reply(entry: str) -> "tuple[str, Optional[Outcome]]":
    """``(task_id, outcome)`` from a reply list entry; ``outcome`` is None for a bare task id
    (the reader then takes the result from the task hash)."""
    entry = entry.strip()
    if not entry.startswith("{"):
        if not entry or len(entry) > 200 or any(c.isspace() for c in entry):
            raise MalformedReply("not a task id")
        return entry, None
    try:
        reply: Any = json.loads(entry)
    except ValueError:
        raise MalformedReply("not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("task_id"), str):
        raise MalformedReply("no task_id")
    status = reply.get("status")
    if status not in (COMPLETED, ERROR):
        raise MalformedReply(f"status {status!r} is not final")

    def field(name: str) -> str:
        value = reply.get(name)
        return "" if value is None else value if isinstance(value, str) else json.dumps(value)

    return reply["task_id"], Outcome(reply["task_id"], status, field("output"), field("error"), field("reason"))
