"""The hero dispatcher's key schema (the ecosystem's later generation, its dispatcher's
``protocol.md``), as a :class:`~circles.backend.job_schema.JobSchema`.

Documented upstream: a job hash ``hero:job:{job_id}`` with ``id`` (UUID v4), ``caller_id``,
``worker_id``, ``context_id``, ``script``, ``timeout`` (seconds), ``retries``, ``concurrent``
(``true``/``false``), ``log_path`` (optional), ``created_at``, ``updated_at`` (ISO 8601),
``status`` (``dispatched``, ``started``, ``error``, ``finished``), ``env_vars`` (JSON object,
optional), ``prerequisites``, ``dependents`` (JSON arrays of job ids, optional), ``output`` and
``error`` (written by the worker); work queues ``hero:work_queue:{worker_id}`` (the dispatcher
LPUSHes job ids, workers BLPOP them), stop queues ``hero:stop_queue:{worker_id}``, a reply list
``hero:reply:{job_id}`` (its payload undocumented). Our choices where that is silent are in
``docs/worker-protocol.md`` ("The hero dispatcher protocol"); in short: ``worker_id`` and
``context_id`` are the circle's key (a circle's workers share its queues), ``timeout`` is whole
seconds, ``retries`` 0, ``concurrent`` false, no ``log_path``, ``env_vars`` carries
``CIRCLES_SOURCE`` (and a webhook event's ``CIRCLES_DATA``), a stop request is the job id, a
reply is the job id.
"""

from __future__ import annotations

import json
import math

from circles.backend.job_schema import Job, JobSchema, iso_time, parse_iso_time

PREFIX = "hero:"
DISPATCHED = "dispatched"
STARTED = "started"
FINISHED = "finished"
ERROR = "error"
#: ``env_vars`` names our server writes and our worker reads.
SOURCE_VARIABLE = "CIRCLES_SOURCE"
DATA_VARIABLE = "CIRCLES_DATA"


class HeroSchema(JobSchema):
    name = "hero"
    queued, running, finished, failed = DISPATCHED, STARTED, FINISHED, ERROR
    bulky = ("script", "output", "error", "env_vars")

    def job_key(self, job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    def queue_key(self, circle: str) -> str:
        return f"{PREFIX}work_queue:{circle}"

    def stop_key(self, circle: str) -> str:
        return f"{PREFIX}stop_queue:{circle}"

    def reply_key(self, job_id: str) -> str:
        return f"{PREFIX}reply:{job_id}"

    def job_fields(self, job: Job) -> dict[str, str]:
        env = {SOURCE_VARIABLE: job.source}
        if job.data is not None:
            env[DATA_VARIABLE] = job.data
        now = iso_time(job.created_at)
        return {
            "id": job.id,
            "caller_id": job.caller,
            "worker_id": job.circle,
            "context_id": job.circle,
            "script": job.script,
            "timeout": str(max(1, math.ceil(job.timeout))),
            "retries": "0",
            "concurrent": "false",
            "created_at": now,
            "updated_at": now,
            "status": DISPATCHED,
            "env_vars": json.dumps(env, separators=(",", ":")),
            "prerequisites": "[]",
            "dependents": "[]",
        }

    def read_job(self, job_id: str, fields: dict[str, str]) -> Job:
        try:
            env = json.loads(fields.get("env_vars") or "{}")
        except ValueError:
            env = {}
        if not isinstance(env, dict):
            env = {}
        try:
            timeout = float(fields.get("timeout", ""))
        except ValueError:
            timeout = 0.0
        data = env.get(DATA_VARIABLE)
        source = env.get(SOURCE_VARIABLE)
        return Job(id=fields.get("id") or job_id,
                   circle=fields.get("context_id") or fields.get("worker_id") or "",
                   caller=fields.get("caller_id") or "", script=fields.get("script") or "",
                   timeout=timeout if math.isfinite(timeout) and timeout > 0 else 0.0,
                   source=source if isinstance(source, str) and source else self.name,
                   created_at=parse_iso_time(fields.get("created_at") or "") or 0.0,
                   data=data if isinstance(data, str) else None)


HERO = HeroSchema()
