"""``Gateway``: the state one server process shares between its sessions, its HTTP routes and
its webhooks (configuration, clock, script backend, metrics, nonces issued over HTTP, log
budgets), so that those reach it without importing one another.

The nonces issued over HTTP, and the jobs (:mod:`circles.server.jobs`), are in this process's
memory until the service gives the gateway stores every process sees
(:class:`~circles.server.access.redis_nonces.RedisNonceStore`,
:class:`~circles.server.jobs.redis_store.RedisJobStore`), as it does whenever it has Redis.

The gateway knows nothing of sessions, their contracts and their JSON-RPC methods: the session
layer (:class:`circles.server.session.methods.Sessions`), built on it by the composition root,
reads what it needs from here; nothing here calls up into it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime

from circles.backend.scripts import IScriptRunner
from circles.common.log_budget import LogBudget
from circles.server.access.nonces import INonceStore, NonceStore
from circles.server.config import Config
from circles.server.jobs.runner import JobLimits, Jobs
from circles.server.jobs.store import IJobStore, MemoryJobStore
from circles.server.metrics import Metrics

if TYPE_CHECKING:
    from circles.backend.members import Membership


class Gateway:
    """What every session of one server shares: configuration, clock, script backend."""

    def __init__(self, config: Config, clock: IReactorTime, scripts: IScriptRunner) -> None:
        self.config = config
        self.clock = clock
        self.scripts = scripts
        #: Who may play in each circle (circles.backend.members.Membership); None: anyone (no Redis).
        self.members: Membership | None = None
        #: Shutting down: no new play is queued (answered -32004 at once), so that a connection
        #: whose client keeps sending is drained once the plays in flight are answered.
        self.draining = False
        #: Stopping (SIGTERM), in its first step: ``/ready`` answers 503 while everything else
        #: serves as usual for ``--drain-grace`` seconds, until ``draining`` (circles.service).
        self.leaving = False
        #: Whether anything (a load balancer) has asked ``/ready`` since start: only then is there
        #: someone to notice its 503, and a stop waits ``--drain-grace`` for them.
        self.readiness_watched = False
        #: The other processes of ``--processes`` (circles.server.processes.siblings.Siblings); None: there are none.
        self.siblings = None
        #: The shared nonce store: nonces issued over HTTP (GET /auth/nonce), before any
        #: connection exists, bound to none, and redeemed by URL authentication or by the
        #: authenticate method of any session: in memory here; in Redis once the service has one.
        self.http_nonces: INonceStore = NonceStore(clock, config.nonce_ttl, config.max_http_nonces,
                                                   config.max_http_nonces_per_ip)
        #: The jobs of the hero contract's jobs methods: in memory here; in Redis once the service
        #: has one (:meth:`use_job_store`).
        self.jobs = self._jobs(MemoryJobStore(clock))
        self.metrics = Metrics(clock)
        # Info lines about what clients get wrong, per minute, process-wide (circles.common.log_budget).
        self.anomaly_log = LogBudget(clock, "sessions' anomalies", shown=50)
        self.refusal_log = LogBudget(clock, "refused WebSocket upgrades", shown=10)
        # Refused webhook deliveries and request bodies over the limit (413).
        self.http_log = LogBudget(clock, "refused HTTP requests", shown=50)

    def _jobs(self, store: IJobStore) -> Jobs:
        config = self.config
        limits = JobLimits(ttl=config.job_ttl, per_caller=config.max_jobs_per_caller,
                           running_per_caller=config.max_running_jobs_per_caller, total=config.max_jobs)
        return Jobs(self.clock, self.scripts, store, limits, members=lambda: self.members)

    def use_job_store(self, store: IJobStore) -> None:
        """Keep jobs in ``store`` (Redis, where every process sees them) from now on."""
        self.jobs = self._jobs(store)

    def unready_reason(self) -> str | None:
        """Why this process cannot take plays now (``/ready``'s 503), or None: shutting down, or
        the script backend unavailable (Redis unreachable, or refusing writes at its maxmemory).

        Asking marks readiness as watched (:attr:`readiness_watched`): every ``/ready``, this
        process's or, under ``--processes``, any process's (circles.server.processes.siblings), asks here."""
        self.readiness_watched = True
        if self.draining or self.leaving:
            return "shutting down"
        if not self.scripts.is_connected():
            # A runner that knows it: Redis answers but refuses writes at its maxmemory.
            full = getattr(self.scripts, "full", False)
            return "script backend unavailable" + (": Redis is full (maxmemory)" if full else "")
        return None

    def stop(self) -> None:
        """Write what the log budgets hold back and cancel their timers."""
        self.anomaly_log.stop()
        self.refusal_log.stop()
        self.http_log.stop()
