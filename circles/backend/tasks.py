"""The task protocol between servers and workers, in one place both sides import.

``docs/worker-protocol.md`` is the written form of what is here (keys, fields, statuses, the
reply, TTLs); keep the two in step. Every step that must not be seen half-done by the other
side is one Lua script, so it is atomic in Redis:

- ``ENQUEUE`` (server, plays): write the task hash and LPUSH its id on the circle's queue, only
  if a live worker serves the circle and, for a client's play, the circle's policy lets the caller
  play (else nothing is written: the play is refused at once); for the plays of one turn of the
  server's event loop at once.
- ``ENQUEUE_ONCE`` (server, webhooks): the same without the worker check, only if a "seen" key
  for the event can be claimed (``SET NX``) in the same step; a redelivered event gets the first
  task's id instead.
- ``HEARTBEAT`` (worker): register the worker as live, for its circles, until Redis time + TTL.
- ``CLAIM`` (worker): a task taken (``BLMOVE``) into the worker's processing list: ``pending`` ->
  ``processing``, counting the attempt; anything else (``expired``, gone) is skipped.
- ``TAKE`` (worker): while its queue is not empty, up to N tasks moved into the processing list and
  claimed in one step (what ``BLMOVE`` and ``CLAIM`` do for one, without blocking).
- ``FINISH`` (worker): ``processing`` -> ``completed``|``error`` and LPUSH the reply, unless the
  task is no longer this worker's (expired by the server, re-run elsewhere); drops the id from
  the processing list either way. ``FINISH_MANY``: the same for several tasks in one step.
- ``EXPIRE`` (server, on timeout): ``pending``|``processing`` -> ``expired``; if the worker
  finished first, its status is returned instead.
- ``DEAD_WORKERS`` / ``REAP`` (servers and workers): the workers whose heartbeat lapsed, and for
  one of them, what becomes of each task in its processing list (re-queued, failed, dead-lettered).
- ``REQUEUE`` (operator): a dead-lettered task back on its queue.

Times that decide whether a worker is live come from Redis (``TIME``, inside the Lua steps), so
the clocks of the hosts do not matter for it.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from circles.backend.members import ADMITS
from circles.common import fast_json

DEFAULT_PREFIX = "circles:"

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
ERROR = "error"
EXPIRED = "expired"
#: A webhook task whose workers were lost ``max_attempts`` times: kept, without TTL, in the
#: dead-letter list until an operator re-queues it (``circles tasks requeue``).
DEAD = "dead"

#: The ``reason`` of an ``error`` result when the worker stopped the script at its own timeout:
#: the server answers it as a timeout (-32003), like its own deadline, not as a failure.
TIMED_OUT = "timeout"
#: The ``reason`` of an ``error`` result when the worker running the task stopped heartbeating
#: (it died, or lost Redis for longer than its TTL): a play is failed with it at once, never re-run.
WORKER_LOST = "worker_lost"

#: Seconds a pending task lives past its deadline; also how long a result replied as a bare
#: task id waits in its hash for the server to read it, and how long a reply list lives after
#: its last reply.
TASK_TTL = 300
#: Seconds the status fields of a finished or expired task are kept once its result (script,
#: data, output, error) is dropped: what the server's EXPIRE needs to tell "finished just now,
#: its reply is on the way" from "never finished", and what an operator may look up.
STATUS_TTL = 30
#: A worker's heartbeat: every HEARTBEAT_INTERVAL seconds it says it is live until Redis time +
#: WORKER_TTL seconds; past that it counts as lost and its tasks are reaped.
HEARTBEAT_INTERVAL = 2.0
WORKER_TTL = 10.0
#: Runs of a webhook task a server allows (``max_attempts``, ``--webhook-attempts``): a task whose
#: worker is lost is run again until then, and dead-lettered after.
DEFAULT_ATTEMPTS = 5
#: Dead workers reaped per look (the rest at the next).
REAP_BATCH = 100


#: Worker. KEYS: the tasks it runs. Returns their statuses ('' for a hash gone): one read for
#: all of them, once a second, so a task the server expired (its client left, its deadline
#: passed) is stopped here rather than run to its timeout for nobody.
STATUSES = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGET', key, 'status') or '' end
return out
"""


def task_key(prefix: str, task_id: str) -> str:
    return f"{prefix}task:{task_id}"


def queue_key(prefix: str, circle: str) -> str:
    return f"{prefix}queue:{circle}"


def reply_key(prefix: str, server_id: str) -> str:
    return f"{prefix}reply:{server_id}"


def seen_key(prefix: str, name: str) -> str:
    """The key that marks an event (``name``, e.g. ``stripe:{circle}:{digest}``) as queued."""
    return f"{prefix}seen:{name}"


def processing_key(prefix: str, worker_id: str) -> str:
    """The list of the task ids a worker has taken and not finished."""
    return f"{prefix}processing:{worker_id}"


def workers_key(prefix: str) -> str:
    """The registry of workers: a sorted set, member the worker id, score when it counts as lost."""
    return f"{prefix}workers"


def circle_workers_key(prefix: str, circle: str) -> str:
    """The live workers of one circle, scored like the registry."""
    return f"{prefix}workers:{circle}"


def dead_key(prefix: str) -> str:
    """The dead-letter list: ids of webhook tasks given up on after ``max_attempts`` runs."""
    return f"{prefix}dead"


def timestamp(seconds: float) -> str:
    """Unix seconds as written in task fields: decimal, millisecond precision."""
    return f"{seconds:.3f}"


# Redis time in Unix seconds, as a Lua number: the first line of every step that decides
# whether a worker is live.
_NOW = """local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: for each circle of the step, its queue, live workers, policy and members; then each play's
# task key. ARGV: the number of circles, each circle's id; the number of arguments shared by every
# task of the step, then those (field, value, ...: the reply list, status, timestamps, ...); then
# for each play eight arguments: its circle's number (1 for the first), the task's ttl, its
# id, '1' to queue it only if the circle's policy lets the caller play (a client's play: one round
# trip for both) or '', the caller, the script, the source, the deadline.
# Returns for each play, in order: {1} when queued; {0} when no live worker serves the circle,
# {-1, policy} when the policy refuses the caller (circles.backend.members.ADMITS): nothing is
# written for it then. The queue's TTL is only ever extended: a short-lived play must not shorten
# the life of a queue holding a long-lived webhook task. The server queues the plays of one turn
# of its event loop in one step: what they share is sent once.
ENQUEUE = ADMITS + _NOW + """
local circles = tonumber(ARGV[1])
local a = 2 + circles
local shared = {}
for i = 1, tonumber(ARGV[a]) do shared[i] = ARGV[a + i] end
a = a + 1 + #shared
local live, queue_ttl, out = {}, {}, {}
for task = 4 * circles + 1, #KEYS do
  local c, ttl, id, caller = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 4]
  local k = 4 * c - 3
  local allowed, policy = true, nil
  if ARGV[a + 3] == '1' then allowed, policy = admits(KEYS[k + 2], KEYS[k + 3], caller) end
  if not allowed then
    out[#out + 1] = {-1, policy}
  else
    if live[c] == nil then live[c] = redis.call('ZCOUNT', KEYS[k + 1], now, '+inf') > 0 end
    if not live[c] then
      out[#out + 1] = {0}
    else
      redis.call('HSET', KEYS[task], 'circle', ARGV[1 + c], 'caller', caller, 'script', ARGV[a + 5],
                 'source', ARGV[a + 6], 'deadline', ARGV[a + 7], unpack(shared))
      redis.call('EXPIRE', KEYS[task], ttl)
      redis.call('LPUSH', KEYS[k], id)
      if (queue_ttl[c] or 0) < ttl then
        if redis.call('TTL', KEYS[k]) < ttl then redis.call('EXPIRE', KEYS[k], ttl) end
        queue_ttl[c] = ttl
      end
      out[#out + 1] = {1}
    end
  end
  a = a + 8
end
return out
"""

# KEYS: seen, task, queue. ARGV: seen ttl, task ttl, task id, field, value, field, value...
# Returns {1, task id} when queued, {0, first task id} when the event was seen before. Claiming
# the seen key and queuing are one step: a crash cannot leave an event marked but not queued,
# nor queued twice. The seen key is the first write, so a Redis refusing writes (OOM) fails the
# whole step before anything changed. No worker check: the task waits for one.
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

# KEYS: registry, then the live-worker set of each circle served. ARGV: worker id, ttl.
# Returns 1 when the worker was not registered (its first heartbeat, or it had been reaped).
HEARTBEAT = _NOW + """
local expiry = now + tonumber(ARGV[2])
local new = redis.call('ZADD', KEYS[1], expiry, ARGV[1])
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], expiry, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. now)
end
return new
"""

# KEYS: registry, then the live-worker set of each circle served. ARGV: worker id.
# A stopping worker leaves the circles' sets (it takes no more tasks); REAP with force then
# takes it out of the registry and deals with what its processing list still holds.
DEREGISTER = """
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""

# KEYS: task, processing list, registry, queue. ARGV: now, worker id, task id.
# Returns the task's fields (HGETALL), or nil: skip it. Claims only a task in this worker's
# processing list (one reaped while this worker was paused belongs to the queue again) and only
# while this worker is live; a worker that is not hands the id back to the queue. Claiming a
# task already claimed by this worker answers its fields again (a CLAIM retried after a lost
# connection), without counting another attempt.
CLAIM = _NOW + """
local status = redis.call('HGET', KEYS[1], 'status')
local mine = redis.call('LPOS', KEYS[2], ARGV[3])
if status == 'processing' and mine and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then
  return redis.call('HGETALL', KEYS[1])
end
local expiry = redis.call('ZSCORE', KEYS[3], ARGV[2])
if not expiry or tonumber(expiry) < now then
  if redis.call('LREM', KEYS[2], 0, ARGV[3]) > 0 and status == 'pending' then
    redis.call('RPUSH', KEYS[4], ARGV[3])
  end
  return false
end
if status ~= 'pending' or not mine then
  redis.call('LREM', KEYS[2], 0, ARGV[3])
  return false
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'processing', 'updated_at', ARGV[1], 'worker', ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: processing list, registry, queue. ARGV: now, worker id, prefix, most.
# Returns {id, values, id, values, ...}: up to ``most`` tasks moved from the queue's end (as BLMOVE
# does) into the processing list and claimed as CLAIM claims one, each with the values of its
# fields TAKEN (HMGET: nil for one it has not; ``attempts`` as counted by this claim) ({} when
# the queue is empty), or nil when this worker is not live (nothing is moved). Under load a
# worker takes what it has room for in one round trip instead of a BLMOVE and a CLAIM for each; a
# task that is no longer pending (expired while it waited) is dropped from the processing list,
# as CLAIM drops it. One HMGET reads the fields and the status, one HSET claims (three commands a
# task, the attempt counted from the value read: the step is atomic).
#: The fields of a task TAKE answers with, in this order: what a worker needs to run it.
TAKEN = ("script", "circle", "caller", "source", "deadline", "data", "max_output", "attempts", "reply_to")
TAKE = _NOW + """
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not expiry or tonumber(expiry) < now then return false end
local out = {}
for _ = 1, tonumber(ARGV[4]) do
  local id = redis.call('LMOVE', KEYS[3], KEYS[1], 'RIGHT', 'LEFT')
  if not id then break end
  local key = ARGV[3] .. 'task:' .. id
  local f = redis.call('HMGET', key, TAKEN, 'status')
  if f[STATUS] == 'pending' then
    local attempts = tostring((tonumber(f[ATTEMPTS]) or 0) + 1)
    redis.call('HSET', key, 'status', 'processing', 'updated_at', ARGV[1], 'worker', ARGV[2], 'attempts', attempts)
    f[ATTEMPTS], f[STATUS] = attempts, nil
    out[#out + 1] = id
    out[#out + 1] = f
  else
    redis.call('LREM', KEYS[1], 0, id)
  end
end
return out
""".replace("TAKEN", ", ".join(f"'{name}'" for name in TAKEN)).replace(
    "STATUS", str(len(TAKEN) + 1)).replace("ATTEMPTS", str(TAKEN.index("attempts") + 1))


# The step FINISH takes for one task, as a Lua function of its keys and arguments (FINISH_MANY
# takes it for several): task key, processing list, reply list (nil: none), then status, output,
# error, now, status ttl, reply, reason, task id, worker id, result ttl (a table, from index ``at``).
# It pushes the reply; the caller sets the reply list's TTL (FINISH_MANY once a list).
_FINISH_ONE = """
local function finish(task, processing, reply_list, A, at)
  local status, output, failure, stamp = A[at], A[at + 1], A[at + 2], A[at + 3]
  local status_ttl, reply, reason, id, worker, result_ttl = A[at + 4], A[at + 5], A[at + 6], A[at + 7],
    A[at + 8], A[at + 9]
  redis.call('LREM', processing, 0, id)
  local held = redis.call('HMGET', task, 'status', 'worker')
  if held[1] ~= 'processing' or held[2] ~= worker then
    return 0
  end
  if reply_list and string.sub(reply, 1, 1) ~= '{' then
    redis.call('HSET', task, 'status', status, 'output', output, 'error', failure, 'updated_at', stamp,
               'reason', reason)
    redis.call('HDEL', task, 'script', 'data')
    redis.call('EXPIRE', task, result_ttl)
  else
    redis.call('HSET', task, 'status', status, 'updated_at', stamp, 'reason', reason)
    redis.call('HDEL', task, 'script', 'data', 'output', 'error')
    redis.call('EXPIRE', task, status_ttl)
  end
  if reply_list then
    redis.call('LPUSH', reply_list, reply)
  end
  return 1
end
"""

# KEYS: task, processing list [, reply list]. ARGV: status, output, error, now, status ttl,
# reply, reason, task id, worker id, result ttl.
# Returns 1 if written, 0 if the task was no longer this worker's (expired, gone, re-run by
# another worker after this one was reaped). A reply object carries the result: the hash keeps
# only its status fields, for ``status ttl`` seconds. A bare task id as the reply: the result
# stays in the hash (``result ttl`` seconds) for the server to read, which then deletes it.
FINISH = _FINISH_ONE + """
local written = finish(KEYS[1], KEYS[2], KEYS[3], ARGV, 1)
if written == 1 and KEYS[3] then redis.call('EXPIRE', KEYS[3], ARGV[10]) end
return written
"""

# FINISH for several tasks at once (the results a worker has in one turn of its event loop).
# KEYS: for each task, its task key, processing list and reply list ('' for none). ARGV: for
# each, FINISH's ten arguments. Returns FINISH's answer for each, in order. A reply list that got
# replies (the replies of one server's plays share one) gets its TTL once, the longest asked.
FINISH_MANY = _FINISH_ONE + """
local out, lists, ttls = {}, {}, {}
for i = 1, #KEYS / 3 do
  local reply_list = KEYS[3 * i]
  if reply_list == '' then reply_list = nil end
  local at = 10 * (i - 1) + 1
  out[i] = finish(KEYS[3 * i - 2], KEYS[3 * i - 1], reply_list, ARGV, at)
  if out[i] == 1 and reply_list then
    local ttl = tonumber(ARGV[at + 9])
    if ttls[reply_list] == nil then lists[#lists + 1] = reply_list end
    if (ttls[reply_list] or 0) < ttl then ttls[reply_list] = ttl end
  end
end
for _, reply_list in ipairs(lists) do redis.call('EXPIRE', reply_list, ttls[reply_list]) end
return out
"""

# KEYS: processing list, queue. ARGV: task id. A task taken when no slot was free after all
# (another circle's loop took the last one): back to the head of its queue, taken next.
GIVE_BACK = """
if redis.call('LREM', KEYS[1], 0, ARGV[1]) > 0 then redis.call('RPUSH', KEYS[2], ARGV[1]) end
return 1
"""

# KEYS: task. ARGV: now, status ttl. Returns {status, output, error, reason}: 'expired' if this
# call expired it, the final status if a worker got there first (its reply is on the way; the
# result fields are there only if it replied with the bare task id), 'missing' if the hash is
# gone. An expired task keeps its status fields only: no worker will run it, and a client that
# queued large scripts and hung up must not leave them in Redis.
EXPIRE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', '', '', ''} end
if status == 'pending' or status == 'processing' then
  redis.call('HSET', KEYS[1], 'status', 'expired', 'updated_at', ARGV[1])
  redis.call('HDEL', KEYS[1], 'script', 'data', 'output', 'error')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'expired', '', '', ''}
end
local fields = redis.call('HMGET', KEYS[1], 'output', 'error', 'reason')
return {status, fields[1] or '', fields[2] or '', fields[3] or ''}
"""

# KEYS: task. Returns {status, output, error, reason} and deletes the hash: the server reading
# the result of a bare task id reply (the reply delivered it; nothing else needs it).
TAKE_RESULT = """
local fields = redis.call('HMGET', KEYS[1], 'status', 'output', 'error', 'reason')
redis.call('DEL', KEYS[1])
return {fields[1] or 'missing', fields[2] or '', fields[3] or '', fields[4] or ''}
"""

# KEYS: registry. Returns the ids of the workers whose heartbeat lapsed (at most REAP_BATCH).
DEAD_WORKERS = _NOW + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
"""

# KEYS: registry, the worker's processing list, dead-letter list. ARGV: prefix, worker id,
# force ('1': the worker itself, stopping; else only a worker whose heartbeat lapsed), status
# ttl, reply ttl. Returns nil when the worker is live (or was reaped already: the step is its
# own lock, two reapers never both act), else {requeued, failed, dead, dropped}. For each id in
# the processing list:
# - hash gone, or final, or another worker's: dropped from the list;
# - pending (taken, never claimed): back on its queue as it is, to be taken next;
# - processing with a reply_to (a play: someone waits, at most once): failed at once, reason
#   worker_lost, the reply pushed;
# - processing without (a webhook task: at least once): pending again and first on its queue,
#   while attempts < max_attempts (absent: 1); else dead, kept without TTL in the dead-letter list.
REAP = _NOW + """
if ARGV[3] ~= '1' then
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if not expiry or tonumber(expiry) >= now then return false end
end
redis.call('ZREM', KEYS[1], ARGV[2])
local stamp = string.format('%.3f', now)
local requeued, failed, dead, dropped = 0, 0, 0, 0
local function requeue(key, queue, id)
  redis.call('RPUSH', queue, id)
  local ttl = redis.call('TTL', key)
  if ttl > 0 and redis.call('TTL', queue) < ttl then redis.call('EXPIRE', queue, ttl) end
end
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local key = ARGV[1] .. 'task:' .. id
  local f = redis.call('HMGET', key, 'status', 'circle', 'reply_to', 'worker', 'attempts', 'max_attempts')
  local queue = ARGV[1] .. 'queue:' .. (f[2] or '')
  if f[1] == 'pending' then
    requeue(key, queue, id)
    requeued = requeued + 1
  elseif f[1] == 'processing' and f[4] == ARGV[2] then
    local attempts, most = tonumber(f[5]) or 1, tonumber(f[6]) or 1
    local why = 'the worker running the script was lost (' .. ARGV[2] .. '), attempt ' .. attempts
    if f[3] and f[3] ~= '' then
      redis.call('HSET', key, 'status', 'error', 'reason', 'worker_lost', 'updated_at', stamp)
      redis.call('HDEL', key, 'script', 'data', 'output', 'error')
      redis.call('EXPIRE', key, ARGV[4])
      redis.call('LPUSH', f[3], cjson.encode({task_id = id, status = 'error', output = '', error = why,
                                              reason = 'worker_lost'}))
      redis.call('EXPIRE', f[3], ARGV[5])
      failed = failed + 1
    elseif attempts < most then
      redis.call('HSET', key, 'status', 'pending', 'updated_at', stamp, 'error', why, 'reason', 'worker_lost')
      requeue(key, queue, id)
      requeued = requeued + 1
    else
      redis.call('HSET', key, 'status', 'dead', 'updated_at', stamp, 'error', why .. ' of ' .. most,
                 'reason', 'worker_lost')
      redis.call('PERSIST', key)
      redis.call('LREM', KEYS[3], 0, id)
      redis.call('LPUSH', KEYS[3], id)
      dead = dead + 1
    end
  else
    dropped = dropped + 1
  end
end
redis.call('DEL', KEYS[2])
return {requeued, failed, dead, dropped}
"""

# KEYS: dead-letter list. ARGV: prefix, task id, task ttl. Returns 1 when the task was dead and
# is queued again (first on its queue), 0 when it was not dead (its id is dropped from the list
# if there). It gets one more run (max_attempts = attempts + 1) and a new deadline as far off
# as its first one was from its creation.
REQUEUE = _NOW + """
local key = ARGV[1] .. 'task:' .. ARGV[2]
if redis.call('HGET', key, 'status') ~= 'dead' then
  redis.call('LREM', KEYS[1], 0, ARGV[2])
  return 0
end
local f = redis.call('HMGET', key, 'circle', 'attempts', 'created_at', 'deadline')
local span = math.max((tonumber(f[4]) or 0) - (tonumber(f[3]) or 0), 1)
redis.call('HSET', key, 'status', 'pending', 'updated_at', string.format('%.3f', now),
           'deadline', string.format('%.3f', now + span), 'max_attempts', (tonumber(f[2]) or 0) + 1)
local ttl = math.ceil(span) + tonumber(ARGV[3])
redis.call('EXPIRE', key, ttl)
redis.call('LREM', KEYS[1], 0, ARGV[2])
local queue = ARGV[1] .. 'queue:' .. (f[1] or '')
redis.call('RPUSH', queue, ARGV[2])
if redis.call('TTL', queue) < ttl then redis.call('EXPIRE', queue, ttl) end
return 1
"""

# KEYS: dead-letter list, then the live-worker set and the queue of each circle. Returns
# {dead letters, live workers, queue length, live workers, queue length, ...}. Reads only.
STATS = _NOW + """
local counts = {redis.call('LLEN', KEYS[1])}
for i = 2, #KEYS, 2 do
  counts[#counts + 1] = redis.call('ZCOUNT', KEYS[i], now, '+inf')
  counts[#counts + 1] = redis.call('LLEN', KEYS[i + 1])
end
return counts
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
    return fast_json.dumps(reply).decode("utf-8")


def decode_reply(entry: str) -> tuple[str, Outcome | None]:
    """``(task_id, outcome)`` from a reply list entry; ``outcome`` is None for a bare task id
    (the reader then takes the result from the task hash)."""
    entry = entry.strip()
    if not entry.startswith("{"):
        if not entry or len(entry) > 200 or any(c.isspace() for c in entry):
            raise MalformedReply("not a task id")
        return entry, None
    try:
        reply: Any = fast_json.loads(entry)
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
