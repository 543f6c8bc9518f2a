"""What servers, workers and operators do to the workers' state in Redis, beyond one task.

- :func:`reap`: give up on the workers whose heartbeat lapsed (``DEAD_WORKERS``, then one
  ``REAP`` step each); servers run it in their health loop, workers with each heartbeat.
- :func:`circle_stats`, :func:`dead_letters`, :func:`requeue`: what ``circles tasks`` shows and
  does (``stats``, ``dead-letter``, ``requeue``); :func:`job_queue_stats`: ``stats`` of a
  dispatcher's protocol (``--worker-protocol hero``).

Each function takes a txredisapi connection or handler (``eval``, ``execute_command``); the Lua
steps are :mod:`circles.backend.tasks`'.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from circles.backend import tasks
from circles.backend.job_schema import JobSchema
from circles.backend.values import text
from circles.common.logs import Logger

log = Logger()

#: Keys looked at per SCAN call, and the most dead letters listed at once.
SCAN_COUNT = 1000
MAX_LISTED = 10_000


async def reap(commands, prefix: str, skip: str | None = None, counter: Any = None) -> int:
    """Reap every worker whose heartbeat lapsed, one REAP step each (the step is the lock: any
    number of reapers may run at once, each worker is reaped once). ``skip``: a worker's own id.
    Returns how many this call reaped, each logged; ``counter.reaped`` counts them too."""
    registry, dead = tasks.workers_key(prefix), tasks.dead_key(prefix)
    reaped = 0
    for worker in [text(w) for w in await commands.eval(tasks.DEAD_WORKERS, [registry], [tasks.REAP_BATCH])]:
        if worker == skip:
            continue
        result = await commands.eval(tasks.REAP, [registry, tasks.processing_key(prefix, worker), dead],
                                     [prefix, worker, "0", tasks.STATUS_TTL, tasks.TASK_TTL])
        if not result:
            continue  # another reaper got there first, or it heartbeated again
        reaped += 1
        if counter is not None:
            counter.reaped += 1
        requeued, failed, dead_letters, dropped = (int(n) for n in result)
        log.warn("worker {worker} stopped heartbeating: reaped; of its tasks {requeued} re-queued, {failed} failed "
                 "(plays), {dead} dead-lettered, {dropped} already over", worker=worker, requeued=requeued,
                 failed=failed, dead=dead_letters, dropped=dropped)
    return reaped


@attrs.frozen
class CircleStats:
    circle: str
    workers: int | None  # live workers (heartbeat within its TTL); None: not known (a dispatcher's workers)
    queue: int  # task ids waiting in the circle's queue
    dead: int | None  # dead letters of the circle; None: the protocol has no dead-letter list


@attrs.frozen
class DeadLetter:
    task_id: str
    circle: str
    source: str
    attempts: int
    error: str
    updated_at: str


async def _scan(commands, pattern: str) -> list[str]:
    keys, cursor = [], "0"
    while True:
        cursor, batch = await commands.execute_command("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
        keys += [text(k) for k in batch]
        if text(cursor) == "0":
            return keys


async def dead_letters(commands, prefix: str, limit: int = MAX_LISTED) -> list[DeadLetter]:
    """The dead-letter list, newest first (at most ``limit``)."""
    letters = []
    for task_id in [text(t) for t in await commands.execute_command("LRANGE", tasks.dead_key(prefix), 0, limit - 1)]:
        fields = await commands.execute_command("HMGET", tasks.task_key(prefix, task_id), "circle", "source",
                                                "attempts", "error", "updated_at", "status")
        circle, source, attempts, error, updated_at, status = (text(f) for f in fields)
        if status != tasks.DEAD:
            continue  # requeued meanwhile, or gone
        letters.append(DeadLetter(task_id, circle, source, int(attempts or 0), error, updated_at))
    return letters


async def circle_stats(commands, prefix: str, circles: Iterable[str] = ()) -> list[CircleStats]:
    """Live workers, queue length and dead letters of ``circles``, and of every circle that has
    a queue, a worker or a dead letter in Redis now."""
    found = set(circles)
    for pattern, _kind in ((tasks.queue_key(prefix, "*"), "queue"), (tasks.circle_workers_key(prefix, "*"), "workers")):
        start = len(pattern) - 1
        found.update(key[start:] for key in await _scan(commands, pattern))
    dead_by_circle: dict[str, int] = {}
    for letter in await dead_letters(commands, prefix):
        dead_by_circle[letter.circle] = dead_by_circle.get(letter.circle, 0) + 1
    found.update(dead_by_circle)
    ordered = sorted(found)
    keys = [tasks.dead_key(prefix)]
    for circle in ordered:
        keys += [tasks.circle_workers_key(prefix, circle), tasks.queue_key(prefix, circle)]
    counts = [int(n) for n in await commands.eval(tasks.STATS, keys, [])]
    return [CircleStats(circle, counts[1 + 2 * i], counts[2 + 2 * i], dead_by_circle.get(circle, 0))
            for i, circle in enumerate(ordered)]


async def job_queue_stats(commands, schema: JobSchema, circles: Iterable[str] = ()) -> list[CircleStats]:
    """The work queue lengths of ``circles`` and of every circle with a work queue in Redis now, in
    a dispatcher's protocol (``schema``): its workers do not register (their number is not known)
    and it has no dead-letter list."""
    pattern = schema.queue_key("*")
    found = set(circles) | {key[len(pattern) - 1:] for key in await _scan(commands, pattern)}
    ordered = sorted(found)
    lengths = [int(await commands.execute_command("LLEN", schema.queue_key(circle))) for circle in ordered]
    return [CircleStats(circle, None, length, None) for circle, length in zip(ordered, lengths)]


async def requeue(commands, prefix: str, task_ids: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """Put dead-lettered tasks back on their queues, first in line (each gets one more run);
    ``task_ids`` None: every one. Returns ``(requeued, not dead)``."""
    if task_ids is None:
        task_ids = [text(t) for t in await commands.execute_command("LRANGE", tasks.dead_key(prefix), 0, -1)]
    done: list[str] = []
    missing: list[str] = []
    for task_id in task_ids:
        result = await commands.eval(tasks.REQUEUE, [tasks.dead_key(prefix)], [prefix, task_id, tasks.TASK_TTL])
        (done if int(result) else missing).append(task_id)
    return done, missing
