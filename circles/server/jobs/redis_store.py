"""``RedisJobStore``: jobs in Redis, where every server process and every server sharing the
Redis sees them. Three kinds of keys::

    {prefix}jobs:{caller}   hash: "_v" -> the table's version; {job id} -> the job (JSON,
                            circles.server.jobs.model.Job.to_json). Expires --job-ttl seconds
                            after its last change (every job in it is younger).
    {prefix}job:{job_id}    hash: "script", and "output" once the job ended (what it printed).
                            Expires with its job.
    {prefix}jobs            sorted set: every live job's id, scored by when it expires (ms):
                            the count --max-jobs bounds, pruned at each change that creates one.

A change is one Lua script (:data:`SAVE`): it applies only onto the version it was computed
from, and bumps it; so two processes changing one caller's jobs at once never lose a write (the
second computes its change again). Keys are made of the caller's key (checked, compressed hex)
and ids the server chose (UUIDs): a client cannot make a key of its choosing, and an id that
does not have their form is refused before any key is built from it
(:func:`circles.server.jobs.model.is_job_id`).

Expiry is Redis's own (``PEXPIREAT``, on times of the injected reactor's clock, so a job's keys
and its ``expires_at`` agree).
"""

from __future__ import annotations

import json
import math

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from circles.backend.commands import TIMEOUT, CommandConnection
from circles.backend.redis_url import RedisAddress
from circles.backend.values import text
from circles.common.logs import Logger, worth_logging
from circles.server.jobs.model import Change, Job, TooManyJobs
from circles.server.jobs.store import IJobStore

log = Logger()
VERSION = "_v"


def table_key(prefix: str, caller: str) -> str:
    return f"{prefix}jobs:{caller}"


def data_key(prefix: str, job_id: str) -> str:
    return f"{prefix}job:{job_id}"


def index_key(prefix: str) -> str:
    return f"{prefix}jobs"


def _ms(seconds: float) -> str:
    return str(math.ceil(seconds * 1000))


# KEYS: the table, the index, then the data key of each job the change writes or removes.
# ARGV[1]: the change, JSON: {version, now, most, table_expires (ms), put: [id, json, ...],
# removed: [id...], drop: [KEYS index...], created: [[id, expires ms]...],
# data: [[KEYS index, expires ms, field, value, ...]...]}.
# Returns 1 written, 0 the table is at another version (nothing written), -1 the server's bound
# of live jobs would be passed (nothing written). Strings everywhere a number is large (ms).
SAVE = """
local change = cjson.decode(ARGV[1])
local version = redis.call('HGET', KEYS[1], '_v') or '0'
if version ~= change.version then return 0 end
if #change.created > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', change.now)
  if change.most ~= '0' and redis.call('ZCARD', KEYS[2]) + #change.created > tonumber(change.most) then
    return -1
  end
end
for _, id in ipairs(change.removed) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
for _, k in ipairs(change.drop) do redis.call('DEL', KEYS[k]) end
for _, job in ipairs(change.created) do redis.call('ZADD', KEYS[2], job[2], job[1]) end
for i = 1, #change.put, 2 do redis.call('HSET', KEYS[1], change.put[i], change.put[i + 1]) end
for _, w in ipairs(change.data) do
  redis.call('HSET', KEYS[w[1]], unpack(w, 3))
  redis.call('PEXPIREAT', KEYS[w[1]], w[2])
end
redis.call('HSET', KEYS[1], '_v', tostring(tonumber(version) + 1))
redis.call('PEXPIREAT', KEYS[1], change.table_expires)
return 1
"""


@implementer(IJobStore)
class RedisJobStore(CommandConnection):
    """Jobs in Redis, on a connection of its own (:class:`~circles.backend.commands.CommandConnection`).

    :param address: the Redis the script runner uses.
    :param reactor: connects, and times commands out.
    :param prefix: prepended to every key (``--redis-prefix``).
    """

    def __init__(self, address: RedisAddress, *, reactor, prefix: str, timeout: float = TIMEOUT) -> None:
        super().__init__(address, reactor=reactor, timeout=timeout, doing="read or write jobs")
        self.prefix = prefix
        self.unreadable = 0  # jobs in Redis that are not a job's JSON (logged: the 1st, 10th...)

    def load(self, caller: str) -> Deferred:
        return self.command(lambda redis: redis.execute_command("HGETALL", table_key(self.prefix, caller)),
                            self._table)

    def _table(self, reply) -> tuple[int, dict[str, Job]] | Failure:
        if isinstance(reply, Failure):
            return reply
        fields = reply if isinstance(reply, list) else [item for pair in (reply or {}).items() for item in pair]
        version, jobs = 0, {}
        for name, value in zip(fields[::2], fields[1::2]):
            name = text(name)
            if name == VERSION:
                version = int(text(value))
                continue
            try:
                jobs[name] = Job.from_json(text(value))
            except (ValueError, TypeError):  # not ours: written by hand, or by another version
                self.unreadable += 1
                if worth_logging(self.unreadable):
                    log.warn("a job in Redis is not readable, and is left out: {id} ({n} so far)", id=name[:100],
                             n=self.unreadable)
        return version, jobs

    def save(self, caller: str, version: int, change: Change, now: float, ttl: float, most: int) -> Deferred:
        keys = [table_key(self.prefix, caller), index_key(self.prefix)]

        def key(job_id: str) -> int:
            keys.append(data_key(self.prefix, job_id))
            return len(keys)  # Lua's index of it in KEYS

        expires = {job.id: job.expires_at for job in change.put}
        encoded = {
            "version": str(version), "now": _ms(now), "most": str(most), "table_expires": _ms(now + ttl),
            "put": [item for job in change.put for item in (job.id, job.to_json())],
            "removed": list(change.removed),
            "drop": [key(job_id) for job_id in change.removed],
            "created": [[job.id, _ms(job.expires_at)] for job in change.created],
            "data": [[key(job_id), _ms(expires[job_id]), *(item for pair in fields.items() for item in pair)]
                     for job_id, fields in change.data.items() if fields],
        }
        return self.command(lambda redis: redis.execute_command(
            "EVAL", SAVE, len(keys), *keys, json.dumps(encoded, ensure_ascii=False)),
            lambda reply: self._saved(reply, most))

    @staticmethod
    def _saved(reply, most: int) -> bool | Failure:
        if isinstance(reply, Failure):
            return reply
        if int(reply) == -1:
            raise TooManyJobs(most, "server")
        return int(reply) == 1

    def read(self, job_id: str, field: str) -> Deferred:
        d = self.command(lambda redis: redis.execute_command("HGET", data_key(self.prefix, job_id), field))
        return d.addCallback(lambda value: None if value is None else text(value))
