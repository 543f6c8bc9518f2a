"""The gateway's configuration: one frozen value, built by the twistd plugin or by hand."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from circles.backend import tasks, worker_protocols
from circles.backend.embedded import derived_maxmemory, physical_memory
from circles.backend.init_scripts import InitScript
from circles.backend.redis_url import parse_redis_url, redact_url
from circles.backend.scripts import DEFAULT_MAX_SCRIPT_SIZE
from circles.common.keys import circle_set
from circles.common.wire import APIS, DEFAULT_API
from circles.server.access.limits import check_origin_pattern
from circles.server.providers.secrets import WebhookSecrets

DEFAULT_MAX_REQUEST_BODY = 1024 * 1024  # bytes, on every HTTP route
DEFAULT_PLAIN_PORT = 8080
DEFAULT_TLS_PORT = 8443


def _as_tuple(values: Iterable[InitScript]) -> tuple[InitScript, ...]:
    return tuple(values)


@attrs.frozen(kw_only=True)
class Config:
    """Everything the gateway needs to know; immutable once the service is built.

    ``circles`` empty means "serve any valid circle id" (a warning is logged once).
    """

    circles: frozenset[str] = attrs.field(default=frozenset(), converter=circle_set)
    # Scripts run once in their circle when its first worker comes up (circles.backend.init_scripts),
    # at most one per circle, each circle among ``circles``.
    init_scripts: tuple[InitScript, ...] = attrs.field(default=(), converter=_as_tuple)
    auth_required: bool = False
    # The contract a connection gets when it offers no subprotocol of ours, by name (circles.common.wire.APIS;
    # each is an object of circles.server.session.contracts): "gateway" ours, "circles" the original circles
    # server's result shapes and error codes, "hero" its later generation's.
    api: str = attrs.field(default=DEFAULT_API, validator=attrs.validators.in_(APIS))
    listen: tuple = ()  # Twisted endpoint strings; when given, port/interface/tls are unused
    port: int | None = None  # None: DEFAULT_TLS_PORT with TLS, else DEFAULT_PLAIN_PORT
    interface: str = ""
    reuse_port: bool = False  # SO_REUSEPORT on port/interface: several processes share the port
    tls: Any = None  # an OpenSSL context factory, e.g. from circles.server.tls.load(); None: plain
    tls_ciphers: str | None = None  # TLS 1.2 cipher string for ``ssl:`` listen strings; None: tls.DEFAULT_CIPHERS
    nonce_ttl: float = 300.0
    max_nonces_per_session: int = 16
    # Live nonces from GET /auth/nonce that this server process issued (they are kept in Redis,
    # where every process sees them, when there is one; circles.server.access.redis_nonces), and of those, to
    # one address (IPv6: one /64; 0: no limit).
    max_http_nonces: int = 10_000
    max_http_nonces_per_ip: int = 100
    max_message_size: int = 1024 * 1024
    # Frames one WebSocket message may come in (a first frame and its continuations); 0: no limit.
    # Fragments are gathered into one buffer as they arrive, so they cost no memory of their own;
    # the cap bounds the work one message may cost (about 5 us a frame, however small).
    max_fragments: int = 4096
    max_batch: int = 100
    max_plays: int = 100  # plays one connection may have waiting for their result; 0: no limit
    # Seconds a connection may stay over its bound of unread replies (twice max_message_size)
    # before it is closed; 0: never (its replies past the bound are still refused, -32007).
    slow_reader_timeout: float = 30.0
    # The largest script a play may carry, UTF-8 bytes; a larger one is refused (-32006) before
    # anything is written to Redis.
    max_script_size: int = DEFAULT_MAX_SCRIPT_SIZE
    rate_limit: float = 200.0  # JSON-RPC requests per second per connection; 0: no limit
    rate_burst: float | None = None  # requests saved up; default twice the rate
    max_connections: int = 10_000  # open WebSocket connections (counted from the handshake); 0: no limit
    max_connections_per_ip: int = 0  # from one address; 0: no limit (a reverse proxy is one address)
    # Connections from one address still sending their request head (accepted, not yet routed);
    # 0: no limit. A client (a reverse proxy too) sends its head at once, so few are ever pending.
    max_pending_per_ip: int = 512
    fd_reserve: int = 100  # descriptors below RLIMIT_NOFILE never used for client connections
    handshake_timeout: float = 10.0  # seconds from TCP accept to an open WebSocket
    idle_timeout: float = 600.0  # seconds without a message before closing; 0: never
    ping_interval: float = 30.0  # WebSocket pings to detect dead peers; 0: off
    ping_timeout: float = 10.0
    # browser Origin patterns accepted at the handshake (circles.server.access.limits.ORIGIN_RULE says how they match)
    allowed_origins: tuple = attrs.field(default=("*",))
    metrics_listen: str | None = None  # endpoint for /metrics alone; None: on the main port
    # Seconds the port keeps accepting after a stop (SIGTERM) while /ready answers 503, so that a
    # load balancer polling /ready stops sending traffic here before the port closes: 5 covers one
    # checking every 2 s that marks a server down after 2 failed checks (HAProxy's "inter 2s fall 2"),
    # with 1 s to spare. Not waited when nothing has asked /ready since the server started.
    drain_grace: float = 5.0
    shutdown_grace: float = 10.0  # seconds in-flight calls get to finish on shutdown
    script_timeout: float = 30.0  # seconds; a play's ``timeout`` may lower it, never raise it
    # Where Redis is (redis://, rediss://, unix://, redis+sentinel://); None: start a private redis-server.
    redis_url: str | None = attrs.field(default=None, repr=lambda url: repr(redact_url(url)))
    redis_prefix: str = tasks.DEFAULT_PREFIX  # prepended to every Redis key
    # The private Redis's directory (its socket is state_dir/redis.sock); None: a temporary one.
    state_dir: str | None = None
    redis_persist: bool = False  # the private Redis keeps its data (append-only file in state_dir)
    # The private Redis's maxmemory in bytes (0: none); None: derived from the limits here
    # (private_redis_maxmemory). A --redis-url's Redis is sized by its operator.
    redis_maxmemory: int | None = None
    playground: bool = False  # serve the browser playground at /playground/
    max_request_body: int = DEFAULT_MAX_REQUEST_BODY  # largest HTTP request body, bytes, on every route
    # Webhooks (docs/webhooks.md). A provider without secrets is off (its endpoint answers 404).
    stripe_secrets: WebhookSecrets = WebhookSecrets()  # repr shows counts only
    idenfy_secrets: WebhookSecrets = WebhookSecrets()
    stripe_script: str | None = None  # script text queued per Stripe event; None: webhooks.STRIPE_SCRIPT
    idenfy_script: str | None = None  # per iDenfy callback; None: webhooks.IDENFY_SCRIPT
    webhook_tolerance: float = 300.0  # seconds a Stripe signature's timestamp may be from now
    webhook_deadline: float = 86400.0  # seconds a queued event may wait for a worker
    webhook_dedupe_ttl: int = 3 * 86400  # seconds a delivered event is remembered (Stripe retries for 3 days)
    # Replicas that must hold an event's task before it is answered 200 (Redis WAIT); None: 1
    # with a redis+sentinel:// URL (a failover must not lose it), else 0 (as one Redis always did).
    webhook_replicas: int | None = None
    webhook_replica_timeout: float = 1.0  # seconds to wait for them, past which 503 (the provider retries)
    # Runs a webhook task gets when the workers running it are lost (it is re-run until then,
    # dead-lettered after: docs/worker-protocol.md).
    webhook_attempts: int = tasks.DEFAULT_ATTEMPTS
    # Jobs (the hero contract's jobs methods; circles.server.jobs), kept in Redis (in memory without
    # one): seconds a job lives from its creation, whatever its status; live jobs of one caller (a
    # key); of those, running at once (more wait their turn); live jobs of every caller. 0: no bound.
    # Each job keeps its script and output: --max-jobs bounds their memory, at most
    # max_jobs * (max_script_size + max_message_size).
    job_ttl: float = 86400.0
    max_jobs_per_caller: int = 100
    max_running_jobs_per_caller: int = 4
    max_jobs: int = 1000
    # How plays and webhook events reach the workers (circles.backend.worker_protocols): "circles", ours
    # (docs/worker-protocol.md), or an ecosystem dispatcher's job schema ("hero": its Rust workers run them).
    worker_protocol: str = attrs.field(default=worker_protocols.CIRCLES, validator=attrs.validators.in_(
        worker_protocols.NAMES))

    @allowed_origins.validator
    def _check_allowed_origins(self, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, str):
            raise ValueError(f"allowed_origins is a sequence of patterns, not one string: ({value!r},)")
        for pattern in value:
            check_origin_pattern(pattern)  # a ValueError saying what is wrong with it

    @init_scripts.validator
    def _check_init_scripts(self, attribute: attrs.Attribute, value: tuple) -> None:
        circles = [init.circle for init in value]
        for circle in circles:
            if circle not in self.circles:
                raise ValueError(f"the init script of circle {circle} is for a circle not served (give it with -k)")
        if len(set(circles)) < len(circles):
            raise ValueError("a circle may have one init script")

    @redis_url.validator
    def _check_redis_url(self, attribute: attrs.Attribute, value: str | None) -> None:
        if value is not None:
            parse_redis_url(value)  # InvalidRedisURL is a ValueError

    def webhook_acks(self) -> int:
        """How many replicas must acknowledge a webhook's task (:attr:`webhook_replicas`, resolved)."""
        if self.webhook_replicas is not None:
            return self.webhook_replicas
        return 1 if self.redis_url is not None and parse_redis_url(self.redis_url).sentinels else 0

    def private_redis_maxmemory(self, processes: int = 1, physical: int | None = None) -> int:
        """The private Redis's ``maxmemory``: :attr:`redis_maxmemory`, else derived from this
        configuration's limits for ``processes`` server processes sharing it
        (:func:`circles.backend.embedded.derived_maxmemory`; ``physical``: the machine's memory,
        by default as the system says)."""
        if self.redis_maxmemory is not None:
            return self.redis_maxmemory
        webhooks = bool(self.stripe_secrets) or bool(self.idenfy_secrets)
        return derived_maxmemory(max_connections=self.max_connections, max_plays=self.max_plays,
                                 max_script=self.max_script_size, max_output=self.max_message_size,
                                 webhook_body=self.max_request_body if webhooks else 0, processes=processes,
                                 physical=physical_memory() if physical is None else physical)

    def serves(self, circle: str) -> bool:
        """Whether ``circle`` (compressed hex, already validated) is served here."""
        return not self.circles or circle in self.circles
