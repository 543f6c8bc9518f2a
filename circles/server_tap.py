"""The ``circles`` twistd plugin: command-line options in, a :class:`CirclesService` out."""

from __future__ import annotations

import getopt
import os

from twisted.application.service import MultiService
from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from circles import logs, tls, webhook_secrets
from circles.backend.embedded import EmbeddedRedisError, find_redis_server, refuse_a_state_dir_in_use
from circles.backend.redis import InvalidRedisURL, parse_redis_url
from circles.config import DEFAULT_PLAIN_PORT, DEFAULT_TLS_PORT, Config
from circles.http.limits import DEFAULT_MAX_BODY
from circles.options import at_least_zero, positive, private_redis_address, redis_parameters, redis_url
from circles.processes import ServerProcesses
from circles.service import CirclesService


def _origins(text: str) -> tuple:
    origins = tuple(o.strip() for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError("no origin given")
    return origins


def _read_script(path, option: str):
    """The text of a script file, or None; a file that cannot be read stops start-up."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"circles: {option}: cannot read {path}: {getattr(e, 'strerror', None) or e}")
    if not text.strip():
        raise SystemExit(f"circles: {option}: {path} is empty")
    return text


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve circles over WebSocket: JSON-RPC 2.0 on /{circle_pk}, secp256k1 authentication, "
        "scripts handed to the circle's workers. Example: "
        "twistd -n circles --auth --tls-cert cert.pem --tls-key key.pem -k <circle_pk>"
    )
    optFlags = [
        ("auth", None, "require authentication before play"),
        ("reuse-port", None, "bind --port with SO_REUSEPORT, sharing it with other server processes "
         "(what --processes does for its children)"),
        ("redis-persist", None, "the private Redis (no --redis-url) keeps its data in --state-dir"),
        ("playground", None, "serve the browser playground at /playground/ (a page to play scripts with a wallet)"),
    ]
    optParameters = [
        logs.LOG_LEVEL_OPTION,
        ("port", "p", None,
         f"TCP port to listen on (default {DEFAULT_PLAIN_PORT}, or {DEFAULT_TLS_PORT} with TLS)", int),
        ("interface", None, "", "address to bind (default: all)"),
        ("tls-cert", None, None, "PEM certificate (chain) file: serve TLS (wss://)"),
        ("tls-key", None, None, "PEM private key file (default: the key is in --tls-cert)"),
        ("tls-ciphers", None, None, "OpenSSL cipher string for TLS 1.2 (default: Mozilla's intermediate "
         "profile, ECDHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3 suites are OpenSSL's)"),
        ("nonce-ttl", None, 300.0, "seconds a nonce stays valid", positive(float)),
        ("max-message-size", None, 1024 * 1024, "largest WebSocket message accepted, in bytes", positive(int)),
        ("processes", None, 1, "server processes sharing the port (use one per core); they share state only "
         "through Redis and stop together", positive(int)),
        ("max-batch", None, 100, "most requests in one JSON-RPC batch", positive(int)),
        ("rate-limit", None, 200.0, "JSON-RPC requests per second per connection, beyond which -32006 (0: no limit)",
         at_least_zero(float)),
        ("rate-burst", None, None, "requests a connection may save up (default: twice --rate-limit)",
         positive(float)),
        ("max-plays", None, 100, "plays one connection may have waiting for their result, beyond which "
         "-32006 (0: no limit)", at_least_zero(int)),
        ("max-nonces", None, 16, "live nonces one connection may hold", positive(int)),
        ("max-connections", None, 10_000, "open WebSocket connections (0: no limit)", at_least_zero(int)),
        ("max-connections-per-ip", None, 0,
         "open WebSocket connections from one address, an IPv6 one by its /64 "
         "(0: no limit; behind a proxy all share one)",
         at_least_zero(int)),
        ("max-pending-per-ip", None, 512,
         "connections from one address (an IPv6 /64) that have not sent their whole request head yet (0: no limit)",
         at_least_zero(int)),
        ("fd-reserve", None, 100, "file descriptors below the process's limit (RLIMIT_NOFILE) kept free: "
         "past the rest, new connections are closed at once", at_least_zero(int)),
        ("max-http-nonces-per-ip", None, 100,
         "live nonces from GET /auth/nonce held by one address (an IPv6 /64) (0: no limit)", at_least_zero(int)),
        ("handshake-timeout", None, 10.0, "seconds from connecting to an open WebSocket (or a whole HTTP request)",
         positive(float)),
        ("idle-timeout", None, 600.0, "seconds without a message before a connection is closed (0: never)",
         at_least_zero(float)),
        ("ping-interval", None, 30.0, "seconds between WebSocket pings that find dead peers (0: off)",
         at_least_zero(float)),
        ("ping-timeout", None, 10.0, "seconds a pong may take before the peer is dropped", positive(float)),
        ("allowed-origins", None, ("*",),
         "comma-separated browser Origin patterns allowed to connect, e.g. https://app.example.com,"
         "https://*.example.com (default: any)", _origins),
        ("metrics-listen", None, None, "Twisted endpoint serving /metrics alone, e.g. tcp:9100:interface=127.0.0.1 "
         "(default: /metrics on the main port)"),
        ("shutdown-grace", None, 10.0, "seconds in-flight calls get to finish when the server stops",
         at_least_zero(float)),
        ("script-timeout", None, 30.0, "seconds a play may take (a play's timeout may only lower it)",
         positive(float)),
        *redis_parameters("Redis shared with the workers: redis://[user:password@]host:port/db, rediss://..., "
                          "unix:///path?db=N", "a private redis-server in --state-dir",
                          "directory of the private Redis (its socket is STATE_DIR/redis.sock, "
                          "where circles-worker looks too)"),
        ("stripe-secret-file", None, None,
         f"file of Stripe webhook signing secrets, one per line, 'SECRET' or 'CIRCLE_PK SECRET' "
         f"(also ${webhook_secrets.STRIPE_ENV}, comma-separated; neither: /webhooks/stripe is off)"),
        ("idenfy-secret-file", None, None,
         f"file of iDenfy webhook signing secrets, same format "
         f"(also ${webhook_secrets.IDENFY_ENV}; neither: /webhooks/idenfy is off)"),
        ("stripe-script", None, None, "file with the script queued for each Stripe event (default: a call of "
         "on_stripe_event(CIRCLES_DATA))"),
        ("idenfy-script", None, None, "file with the script queued for each iDenfy callback (default: a call of "
         "on_idenfy_callback(CIRCLES_DATA))"),
        ("webhook-tolerance", None, 300.0, "seconds a Stripe signature's timestamp may differ from now",
         positive(float)),
        ("webhook-max-body", None, DEFAULT_MAX_BODY, "largest HTTP request body accepted, in bytes", positive(int)),
        ("webhook-deadline", None, 86400.0, "seconds a queued webhook event may wait for a worker",
         positive(float)),
        ("webhook-dedupe-ttl", None, 3 * 86400, "seconds a webhook event is remembered, so a redelivery "
         "is not queued again", positive(int)),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["circles"] = []
        self["listen"] = []

    def opt_circle(self, pubkey: str) -> None:
        """circle to serve, as its public key in hex (repeatable; default: any)"""
        self["circles"].append(pubkey)

    opt_k = opt_circle

    def opt_listen(self, description: str) -> None:
        """Twisted endpoint to listen on, e.g. tcp:8080 or ssl:8443:privateKey=k.pem:certKey=c.pem (repeatable; overrides --port)"""
        self["listen"].append(description)

    def parseOptions(self, options=None) -> None:
        # Kept for --processes, which starts the other processes with the same options.
        self.argv = list(options) if options is not None else []
        super().parseOptions(options)

    def postOptions(self) -> None:
        if self["processes"] > 1 and (self["listen"] or self["metrics-listen"]):
            # Every process would bind them: the second fails (address in use) and dies.
            raise usage.UsageError("--processes shares --port (and --tls-cert) between processes; "
                                   "it cannot share --listen or --metrics-listen endpoints")
        if self["tls-key"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-key needs --tls-cert")
        # Bad files, keys and a missing redis-server are not usage mistakes: they get one line
        # saying what is wrong (SystemExit), not the help text (UsageError).
        if self["tls-ciphers"] is not None:
            try:
                tls.tls12_ciphers(self["tls-ciphers"])
            except tls.TLSError as e:
                raise SystemExit(f"circles: {e}")
        for description in self["listen"] + ([self["metrics-listen"]] if self["metrics-listen"] else []):
            try:
                serverFromString(global_reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"{description!r} is not a valid endpoint: {e}")
        url = redis_url(self["redis-url"])
        if url is not None:
            try:
                address = parse_redis_url(url)
            except InvalidRedisURL as e:
                raise usage.UsageError(f"--redis-url: {e}")
            try:
                address.endpoint(global_reactor)  # reads an ssl_ca_certs file: a bad one stops start-up
            except InvalidRedisURL as e:
                raise SystemExit(f"circles: --redis-url: {e}")
        else:
            try:
                find_redis_server()
                refuse_a_state_dir_in_use(private_redis_address(self["state-dir"]).path)
            except EmbeddedRedisError as e:
                raise SystemExit(f"circles: {e}")
        try:
            tls_options = (tls.load(self["tls-cert"], self["tls-key"], self["tls-ciphers"])
                           if self["tls-cert"] else None)
        except tls.TLSError as e:
            raise SystemExit(f"circles: {e}")
        try:
            stripe_secrets = webhook_secrets.load(os.environ.get(webhook_secrets.STRIPE_ENV),
                                                  self["stripe-secret-file"])
            idenfy_secrets = webhook_secrets.load(os.environ.get(webhook_secrets.IDENFY_ENV),
                                                  self["idenfy-secret-file"])
        except webhook_secrets.SecretsError as e:
            raise SystemExit(f"circles: webhook secrets: {e}")
        scripts = {name: _read_script(self[f"{name}-script"], f"--{name}-script") for name in ("stripe", "idenfy")}
        try:
            self.config = Config(
                circles=self["circles"],
                auth_required=self["auth"],
                listen=tuple(self["listen"]),
                port=self["port"],
                interface=self["interface"],
                reuse_port=self["reuse-port"] or self["processes"] > 1,
                tls=tls_options,
                tls_ciphers=self["tls-ciphers"],
                nonce_ttl=self["nonce-ttl"],
                max_message_size=self["max-message-size"],
                max_batch=self["max-batch"],
                rate_limit=self["rate-limit"],
                rate_burst=self["rate-burst"],
                max_plays=self["max-plays"],
                max_nonces_per_session=self["max-nonces"],
                max_connections=self["max-connections"],
                max_connections_per_ip=self["max-connections-per-ip"],
                max_pending_per_ip=self["max-pending-per-ip"],
                fd_reserve=self["fd-reserve"],
                max_http_nonces_per_ip=self["max-http-nonces-per-ip"],
                handshake_timeout=self["handshake-timeout"],
                idle_timeout=self["idle-timeout"],
                ping_interval=self["ping-interval"],
                ping_timeout=self["ping-timeout"],
                allowed_origins=self["allowed-origins"],
                shutdown_grace=self["shutdown-grace"],
                metrics_listen=self["metrics-listen"],
                script_timeout=self["script-timeout"],
                redis_url=url,
                redis_prefix=self["redis-prefix"],
                state_dir=self["state-dir"],
                redis_persist=self["redis-persist"],
                playground=self["playground"],
                stripe_secrets=stripe_secrets,
                idenfy_secrets=idenfy_secrets,
                stripe_script=scripts["stripe"],
                idenfy_script=scripts["idenfy"],
                webhook_tolerance=self["webhook-tolerance"],
                webhook_max_body=self["webhook-max-body"],
                webhook_deadline=self["webhook-deadline"],
                webhook_dedupe_ttl=self["webhook-dedupe-ttl"],
            )
        except ValueError as e:
            raise SystemExit(f"circles: -k/--circle: {e}")


def makeService(config: Options, reactor=global_reactor):
    logs.set_level(config["log-level"])
    service = CirclesService(config.config, reactor=reactor)
    if config["processes"] == 1:
        return service
    # This process listens first (a port 0 becomes a real one), then starts the others on it;
    # they stop first, while the private Redis (ours) still runs for them.
    argv = child_argv(config, config.argv)
    if service.embedded_redis is not None:
        argv += ["--redis-url", f"unix://{service.embedded_redis.address.path}"]
    group = MultiService()
    service.setServiceParent(group)
    ServerProcesses(reactor, config["processes"] - 1, argv, service.when_listening,
                    stop_timeout=config.config.shutdown_grace + 10).setServiceParent(group)
    return group


def child_argv(options: usage.Options, argv: list) -> list:
    """``argv`` as the other server processes get it: every option under its full name, and
    ``--processes`` replaced by ``--processes=1``, so a child never starts processes of its own.

    Built from getopt's parse (the one ``usage.Options`` does), not by matching the text the user
    typed: getopt takes any unique prefix (``--proc 2``), ``--processes=2`` and ``--processes 2``
    alike.
    """
    pairs, rest = getopt.getopt(argv, options.shortOpt, options.longOpt)
    parameters = {name[:-1] for name in options.longOpt if name.endswith("=")}
    kept = []
    for opt, value in pairs:
        name = options.synonyms[opt.lstrip("-")]
        if name == "processes":
            continue
        kept.append(f"--{name}={value}" if name in parameters else f"--{name}")
    return kept + ["--processes=1", *rest]
