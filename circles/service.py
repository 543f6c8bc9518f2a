"""``CirclesService``: the whole gateway as one Twisted service, for twistd or embedding.

A larger application attaches it to its own service tree::

    from circles import CirclesService, Config
    CirclesService(Config(circles=[pk], listen=("tcp:8080",)), reactor=reactor).setServiceParent(app)
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Site

from circles.backend import worker_protocols
from circles.backend.dispatch import RedisScriptRunner
from circles.backend.embedded import EmbeddedRedis
from circles.backend.init_scripts import InitScripts
from circles.backend.job_dispatch import JobScriptRunner
from circles.backend.members import Membership
from circles.backend.redis_url import parse_redis_url
from circles.backend.scripts import IScriptRunner
from circles.common.logs import Logger
from circles.common.once import Once
from circles.protocol import CircleFactory
from circles.server import tls
from circles.server.access.redis_nonces import TIMEOUT as NONCE_TIMEOUT
from circles.server.access.redis_nonces import RedisNonceStore
from circles.server.config import DEFAULT_PLAIN_PORT, DEFAULT_TLS_PORT, Config
from circles.server.gateway import Gateway
from circles.server.http.accepts import AcceptGate
from circles.server.http.eager import send_eagerly
from circles.server.http.site import OnFirstRequest, build_metrics_site, edge_site
from circles.server.http.upgrade import UpgradeRouter
from circles.server.jobs.redis_store import RedisJobStore
from circles.server.processes.group import ReusePortEndpoint, inherited_listen_fd
from circles.server.providers.secrets import providers_line
from circles.server.session.contracts import CONTRACTS
from circles.server.session.methods import Sessions

log = Logger()
#: Pending TCP connections the kernel queues for us. Twisted's default, 50, overflows in a
#: reconnect storm (clients then wait for SYN retransmits); the kernel caps it at somaxconn.
LISTEN_BACKLOG = 1024
#: Seconds to wait, at the end of shutdown, for clients to answer our close frames.
CLOSE_WAIT = 2.0


def build_site(factory: CircleFactory, reactor: Any) -> Site:
    """The one Site of a server: the HTTP edge's routes with the server's two faces on them, the
    WebSocket of every circle (``factory``) and the webhook routes of its gateway (built at the
    first webhook); ``/openrpc.json`` is the document of the contract of a connection that asks
    for none (the server's ``--api``)."""
    gateway = factory.gateway
    return edge_site(gateway, WebSocketResource(factory), OnFirstRequest(lambda: _webhook_routes(gateway)),
                     factory.sessions.default.document_text(), reactor)


def _webhook_routes(gateway: Gateway) -> IResource:
    """``/webhooks``'s Klein app (:mod:`circles.webhooks`), imported when it is built."""
    from circles.webhooks import WebhookRoutes

    return WebhookRoutes(gateway).app.resource()


def endpoint_from_string(reactor: Any, description: str, ciphers: str | None = None) -> IStreamServerEndpoint:
    """A Twisted endpoint string's server endpoint; an ``ssl:`` one gets our TLS policy (ALPN,
    versions, ``ciphers``) instead of Twisted's defaults, which accept static RSA and CBC
    (:func:`circles.server.tls.ssl_endpoint`: :class:`~circles.server.tls.TLSError` if its files
    cannot be used)."""
    return tls.ssl_endpoint(reactor, description, ciphers) or serverFromString(reactor, description)


def server_endpoints(config: Config, reactor: Any) -> list:
    """The endpoints to listen on: ``config.listen`` strings, else the port (TLS if configured)."""
    if config.listen:
        return [endpoint_from_string(reactor, description, config.tls_ciphers) for description in config.listen]
    if config.reuse_port:
        port = (DEFAULT_TLS_PORT if config.tls is not None else DEFAULT_PLAIN_PORT) if config.port is None else config.port
        # One of --processes: on the socket the first process bound for it (circles.server.processes.group).
        return [ReusePortEndpoint(reactor, port, config.interface, LISTEN_BACKLOG, config.tls,
                                  fd=inherited_listen_fd())]
    if config.tls is not None:
        port = DEFAULT_TLS_PORT if config.port is None else config.port
        return [tls.TLSServerEndpoint(reactor, port, config.tls, backlog=LISTEN_BACKLOG, interface=config.interface)]
    port = DEFAULT_PLAIN_PORT if config.port is None else config.port
    return [TCP4ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=config.interface)]


def cannot_listen(error: Exception) -> str:
    """Why an endpoint could not listen, in words: ``cannot listen on 127.0.0.1:8080: Address
    already in use``."""
    if not isinstance(error, CannotListenError):
        return f"cannot listen: {error}"
    reason = error.socketError
    reason = getattr(reason, "strerror", None) or str(reason)
    if isinstance(error.port, int):
        where = f"[{error.interface}]:{error.port}" if ":" in (error.interface or "") else \
            f"{error.interface or '*'}:{error.port}"
    else:  # a unix socket: the port is its path
        where = f"unix:{error.port}"
    return f"cannot listen on {where}: {reason}"


class ListeningService(Service):
    """Listens on one endpoint while running; :meth:`when_listening` gives the bound port.

    The port is bound in :meth:`privilegedStartService`, which ``twistd`` calls before it drops
    privileges (``--uid``/``--gid``), so a server started as root serves port 443 as its own
    user; embedded, :meth:`startService` binds it (when nothing did before). TCP and TLS
    endpoints bind synchronously, so a port in use makes either raise: ``twistd`` then exits
    with the reason instead of running without a socket.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory,
                 gate: AcceptGate | None = None) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._gate = gate  # counts and bounds the connections accepted
        self._listening = Once()  # the IListeningPort of this start, or why there is none
        self.port: IListeningPort | None = None  # once bound

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:  # not bound by privilegedStartService (embedded, or after a stop)
            self._listen()

    def _listen(self) -> None:
        self._endpoint.listen(self._factory).addCallbacks(self._bound, self._failed)
        if isinstance(self._listening.result, Failure):
            self._listening.result.raiseException()

    def _bound(self, port: IListeningPort) -> None:
        self.port = port
        send_eagerly(port)
        if self._gate is not None:
            self._gate.install(port)
        self._listening.fire(port)

    def _failed(self, failure: Failure) -> None:
        if not failure.check(CannotListenError):
            # A unix socket in a directory that is not there fails making its lock file (an
            # OSError): the same mistake, said the same way.
            where = getattr(self._endpoint, "_address", None) or repr(self._endpoint)
            failure = Failure(CannotListenError(None, where, failure.value))
        log.error("{reason}", reason=cannot_listen(failure.value))  # type: ignore[arg-type]  # an Exception
        self._listening.fire(failure)

    def when_listening(self) -> Deferred:
        """Fire with the ``IListeningPort`` once bound, or fail as binding failed."""
        return self._listening.when()

    def stopService(self) -> Deferred | None:
        super().stopService()
        self._listening = Once()  # asked from now on: the port of the next start
        port, self.port = self.port, None
        return None if port is None else port.stopListening()


class CirclesService(MultiService):
    """The gateway: every listening endpoint sharing one :class:`~circles.server.gateway.Gateway`."""

    def __init__(self, config: Config, *, reactor: Any, scripts: IScriptRunner | None = None) -> None:
        super().__init__()
        self.config = config
        self.embedded_redis: EmbeddedRedis | None = None
        self.script_runner: RedisScriptRunner | JobScriptRunner | None = None  # None when ``scripts`` is given
        self.membership: Membership | None = None  # who may play: with the script runner's Redis
        # Nonces from GET /auth/nonce, where every process and server sees them: with the script
        # runner's Redis; None (in the gateway's memory) when ``scripts`` is given.
        self.nonces: RedisNonceStore | None = None
        # Jobs (the hero contract's jobs methods), where every process and server sees them: with
        # the script runner's Redis; None (in the gateway's memory) when ``scripts`` is given.
        self.job_store: RedisJobStore | None = None
        if scripts is None:
            # Children start in order and stop in reverse: Redis first up and last down, so the
            # script runner can answer in-flight plays (and expire their tasks) on shutdown.
            if config.redis_url is None:
                self.embedded_redis = EmbeddedRedis(config.state_dir, reactor=reactor, persist=config.redis_persist,
                                                    maxmemory=config.private_redis_maxmemory())
                self.embedded_redis.setServiceParent(self)
                address = self.embedded_redis.address
            else:
                address = parse_redis_url(config.redis_url)
            schema = worker_protocols.schema(config.worker_protocol)
            if schema is None:
                # No output the server could not send back (its largest message) is worth storing.
                self.script_runner = RedisScriptRunner(address, reactor=reactor, prefix=config.redis_prefix,
                                                       max_output=config.max_message_size,
                                                       private_redis=self.embedded_redis is not None,
                                                       ack_replicas=config.webhook_acks(),
                                                       ack_timeout=config.webhook_replica_timeout,
                                                       circles=config.circles,
                                                       webhook_attempts=config.webhook_attempts)
            else:  # an ecosystem dispatcher's protocol: its workers do not heartbeat, nothing is reaped
                self.script_runner = JobScriptRunner(address, schema=schema, reactor=reactor,
                                                     prefix=config.redis_prefix,
                                                     private_redis=self.embedded_redis is not None,
                                                     ack_replicas=config.webhook_acks(),
                                                     ack_timeout=config.webhook_replica_timeout,
                                                     circles=config.circles)
            self.script_runner.setServiceParent(self)
            scripts = self.script_runner
            self.membership = Membership(address, reactor=reactor, prefix=config.redis_prefix)
            self.membership.setServiceParent(self)
            # A handshake with URL authentication waits for it: no longer than the handshake may take.
            self.nonces = RedisNonceStore(address, reactor=reactor, prefix=config.redis_prefix, ttl=config.nonce_ttl,
                                          cap=config.max_http_nonces, per_owner=config.max_http_nonces_per_ip,
                                          timeout=min(NONCE_TIMEOUT, config.handshake_timeout))
            self.nonces.setServiceParent(self)
            self.job_store = RedisJobStore(address, reactor=reactor, prefix=config.redis_prefix)
            self.job_store.setServiceParent(self)
        # The init scripts (-k PK:FILE), queued once their circle's first worker is seen: housekeeping
        # reads the circles' live workers every heartbeat interval already.
        self.init_scripts: InitScripts | None = None
        if config.init_scripts:
            if self.script_runner is None:
                raise ValueError("init scripts need the server's own script runner (Redis), not scripts=")
            runner = self.script_runner
            self.init_scripts = InitScripts(config.init_scripts, runner.run, runner.command, clock=reactor,
                                            prefix=config.redis_prefix, who=f"server {runner.server_id}",
                                            timeout=config.script_timeout)
            runner.housekeeping.watchers.append(self.init_scripts.workers_seen)
            self.init_scripts.setServiceParent(self)
        self.reactor = reactor
        self.gateway = Gateway(config, reactor, scripts)
        self.gateway.members = self.membership
        if self.nonces is not None:
            self.gateway.http_nonces = self.nonces
        if self.job_store is not None:
            self.gateway.use_job_store(self.job_store)
        # The session layer on the gateway's state: every contract the server speaks, with its dispatcher.
        self.sessions = Sessions(self.gateway, CONTRACTS)
        self.factory = CircleFactory(self.sessions, time_handshake=False)  # the router times it
        self.site = build_site(self.factory, reactor)
        self.router = UpgradeRouter(self.factory, self.site, reactor, config.handshake_timeout,
                                    config.max_pending_per_ip, self.gateway.http_log)
        # One count for every port: they share the process's descriptors.
        self.accepts = AcceptGate.below_descriptor_limit(config.fd_reserve)
        self.listeners = [ListeningService(endpoint, self.router, self.accepts)
                          for endpoint in server_endpoints(config, reactor)]
        self.metrics_listener: ListeningService | None = None
        if config.metrics_listen is not None:
            # The same edge as the main port: request deadline, pending cap, bounded bodies.
            metrics_router = self.router.serving(build_metrics_site(self.gateway, reactor))
            self.metrics_listener = ListeningService(
                endpoint_from_string(reactor, config.metrics_listen, config.tls_ciphers), metrics_router, self.accepts)
            self.metrics_listener.setServiceParent(self)
        accepts, router = self.accepts, self.router
        self.gateway.metrics.watch_accepts(lambda: accepts.open, {"descriptors": lambda: accepts.refused,
                                                                  "pending_per_ip": lambda: router.refused})
        if self.script_runner is not None:
            runner = self.script_runner
            self.gateway.metrics.watch_script_runner(lambda: runner.in_flight, lambda: runner.connects)
            self.gateway.metrics.watch_workers(lambda: runner.housekeeping.circle_stats,
                                               lambda: runner.housekeeping.dead_letters)
        for listener in self.listeners:
            listener.setServiceParent(self)

    def startService(self) -> None:
        if not self.config.circles:
            log.warn("no circles configured (-k): serving any valid circle id")
        if self.accepts.limit:
            log.info("accepting at most {limit} connections at once (the descriptor limit less --fd-reserve "
                     "{reserve}); at most {pending} from one address before their request (--max-pending-per-ip)",
                     limit=self.accepts.limit, reserve=self.config.fd_reserve,
                     pending=self.config.max_pending_per_ip or "any number")
        line, fields = providers_line(self.config.stripe_secrets, self.config.idenfy_secrets)
        log.info("{webhooks}", webhooks=line, **fields)
        super().startService()

    def stopService(self) -> Deferred:
        """Shut down gracefully, in this order: ``/ready`` answers 503 while the port keeps
        accepting and serving as usual for ``drain_grace`` seconds (if anything has asked
        ``/ready``: a load balancer then takes this server out before its port closes, instead
        of meeting refused connections); stop accepting connections; let in-flight
        calls finish (up to ``shutdown_grace``) while each connection closes with 1001 once
        it has nothing in flight; stop the jobs still running in this process (each ends in error,
        saying so); stop the script runner, which answers what is left (-32004);
        say goodbye to the last connections; stop the embedded Redis."""
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        await self._leave()
        await DeferredList([maybeDeferred(listener.stopService) for listener in self.listeners])
        await self._bounded(self.factory.drain(), self.config.shutdown_grace)
        # The jobs still running here end (in error, saying so) while Redis can still record it.
        await self.gateway.jobs.stop()
        if self.init_scripts is not None:  # while Redis is there to take their claims back
            await maybeDeferred(self.init_scripts.stopService)
        if self.script_runner is not None:
            await maybeDeferred(self.script_runner.stopService)
        if self.membership is not None:
            await maybeDeferred(self.membership.stopService)
        if self.nonces is not None:
            await maybeDeferred(self.nonces.stopService)
        if self.job_store is not None:
            await maybeDeferred(self.job_store.stopService)
        self.factory.close_all()
        await self._bounded(self.factory.drain(), CLOSE_WAIT)
        self.gateway.stop()
        if self.metrics_listener is not None:
            await maybeDeferred(self.metrics_listener.stopService)
        if self.embedded_redis is not None:
            await maybeDeferred(self.embedded_redis.stopService)

    async def _leave(self) -> None:
        """The first step of a stop: unready at once, still serving for the drain grace."""
        gateway, grace = self.gateway, self.config.drain_grace
        gateway.leaving = True
        if not grace or not gateway.readiness_watched:
            return
        log.info("shutting down: /ready answers 503; still accepting for {grace:g}s (--drain-grace) so that load "
                 "balancers send traffic elsewhere first", grace=grace)
        await deferLater(self.reactor, grace)
        log.info("shutting down: no longer accepting; {n} connection(s) close with 1001 once their calls are answered",
                 n=len(self.factory.open_connections))

    async def _bounded(self, d: Deferred, seconds: float) -> None:
        d.addTimeout(seconds, self.reactor)
        try:
            await d
        except TimeoutError:
            log.info("shutdown: {n} connection(s) still open after {seconds}s",
                     n=len(self.factory.open_connections), seconds=seconds)

    def when_listening(self) -> Deferred:
        """Fire with the list of bound ports, in the order of the endpoints."""
        d = DeferredList([listener.when_listening() for listener in self.listeners],
                         fireOnOneErrback=True, consumeErrors=True)
        d.addCallback(lambda results: [port for _, port in results])
        return d
