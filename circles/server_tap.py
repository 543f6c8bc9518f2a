"""The ``circles`` twistd plugin: command-line options in, a :class:`CirclesService` out."""

from __future__ import annotations

import getopt
import os
import secrets
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet import reactor as global_reactor
from twisted.internet.error import CannotListenError
from twisted.python import usage

from circles.backend import worker_protocols
from circles.backend.embedded import EmbeddedRedisError, find_redis_server, refuse_a_state_dir_in_use
from circles.backend.init_scripts import InitScriptError, parse_circles, split_circle
from circles.backend.redis_options import choose_redis, redis_parameters
from circles.backend.redis_url import InvalidRedisURL
from circles.common import logs
from circles.common.options import (
    at_least_zero,
    describe_source,
    from_environment,
    positive,
    print_version,
    read_dotenv,
)
from circles.server import tls
from circles.server.access.limits import ORIGIN_RULE, check_origin_pattern
from circles.server.config import DEFAULT_PLAIN_PORT, DEFAULT_TLS_PORT, Config
from circles.server.processes import group as processes
from circles.server.processes import siblings
from circles.server.processes.group import ServerProcesses
from circles.server.providers import secrets as webhook_secrets
from circles.server.session.contracts import CONTRACTS
from circles.service import LISTEN_BACKLOG, CirclesService, cannot_listen, endpoint_from_string

log = logs.Logger()

#: The options that set one :class:`Config` field each, as they are, by the field's name. Their
#: defaults are the fields' (written once, in Config); the other options are read in postOptions.
CONFIG_FIELDS = {
    "auth": "auth_required", "api": "api", "port": "port", "interface": "interface", "tls-ciphers": "tls_ciphers",
    "nonce-ttl": "nonce_ttl", "max-message-size": "max_message_size", "max-fragments": "max_fragments",
    "max-batch": "max_batch",
    "rate-limit": "rate_limit", "rate-burst": "rate_burst", "max-plays": "max_plays",
    "slow-reader-timeout": "slow_reader_timeout",
    "max-script-size": "max_script_size",
    "max-nonces": "max_nonces_per_session", "max-connections": "max_connections",
    "max-connections-per-ip": "max_connections_per_ip", "max-pending-per-ip": "max_pending_per_ip",
    "fd-reserve": "fd_reserve", "max-http-nonces-per-ip": "max_http_nonces_per_ip",
    "handshake-timeout": "handshake_timeout", "idle-timeout": "idle_timeout", "ping-interval": "ping_interval",
    "ping-timeout": "ping_timeout", "allowed-origins": "allowed_origins", "metrics-listen": "metrics_listen",
    "drain-grace": "drain_grace", "shutdown-grace": "shutdown_grace", "script-timeout": "script_timeout", "redis-prefix": "redis_prefix",
    "redis-persist": "redis_persist", "playground": "playground", "webhook-tolerance": "webhook_tolerance",
    "max-request-body": "max_request_body", "webhook-deadline": "webhook_deadline",
    "webhook-dedupe-ttl": "webhook_dedupe_ttl", "webhook-replicas": "webhook_replicas",
    "webhook-replica-timeout": "webhook_replica_timeout", "webhook-attempts": "webhook_attempts",
    "job-ttl": "job_ttl", "max-jobs-per-caller": "max_jobs_per_caller",
    "max-running-jobs-per-caller": "max_running_jobs_per_caller", "max-jobs": "max_jobs",
    "worker-protocol": "worker_protocol",
}

#: Former names still accepted, and the options they are now.
DEPRECATED = {"webhook-max-body": "max-request-body"}


def _setting(option: str, help: str, coerce: Callable | None = None, short: str | None = None) -> tuple:
    """The ``optParameters`` row of an option of :data:`CONFIG_FIELDS`: its default is its field's.

    A tuple default (``--allowed-origins``) is written as it is given, comma-separated: the help
    shows ``[default: *]``, not a Python tuple; :func:`_config_value` turns it back."""
    default = attrs.fields_dict(Config)[CONFIG_FIELDS[option]].default
    if isinstance(default, tuple):
        default = ",".join(default)
    return (option, short, default, help, coerce)


def _config_value(options: usage.Options, option: str):
    """An option of :data:`CONFIG_FIELDS` as its Config field takes it: the default of a tuple
    field, left as the text :func:`_setting` showed, is the field's own default again."""
    value = options[option]
    default = attrs.fields_dict(Config)[CONFIG_FIELDS[option]].default
    if isinstance(default, tuple) and isinstance(value, str):
        return default
    return value


_request_body = positive(int)


def _origins(text: str) -> tuple:
    origins = tuple(check_origin_pattern(o) for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError("no origin given")
    return origins


_MEMORY_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000 ** 2, "mb": 1024 ** 2, "g": 1000 ** 3,
                 "gb": 1024 ** 3}


def memory_size(text: str) -> int:
    """Bytes, as Redis's own configuration writes them: ``268435456``, ``256mb``, ``1gb``
    (``k``/``m``/``g`` are powers of 1000, ``kb``/``mb``/``gb`` of 1024); 0 is allowed."""
    number = text.strip().lower().rstrip("bgkm")
    unit = text.strip().lower()[len(number):]
    if not number.isdigit() or unit not in _MEMORY_UNITS:
        raise ValueError(f"{text!r} is not a size in bytes (e.g. 268435456, 256mb, 1gb)")
    return int(number) * _MEMORY_UNITS[unit]


memory_size.__name__ = "size"  # usage.Options names the type in its error message


def _api(text: str) -> str:
    if text not in CONTRACTS.names:
        raise ValueError(f"{text!r} is not one of {', '.join(CONTRACTS.names)}")
    return text


def _read_script(path, option: str):
    """The text of a script file, or None; a file that cannot be read stops start-up."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"circles: {option}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not text.strip():
        raise SystemExit(f"circles: {option}: {path} is empty")
    return text


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve circles over WebSocket: JSON-RPC 2.0 on /{circle_pk}, secp256k1 authentication, "
        "scripts handed to the circle's workers. Example: "
        "twistd -n circles --auth --tls-cert cert.pem --tls-key key.pem -k <circle_pk>, or as the Rust server "
        "was started: twistd -n circles --auth --tls --cert cert.pem --key key.pem"
    )
    optFlags = [
        ("auth", None, "require authentication before play"),
        ("tls", None, "serve TLS (wss://), as the Rust server's --tls: the certificate is --cert (or --tls-cert), "
         "required with it"),
        ("reuse-port", None, "bind --port with SO_REUSEPORT, sharing it with other server processes "
         "(what --processes does for its children)"),
        ("redis-persist", None, "the private Redis (no --redis-url) keeps its data in --state-dir"),
        ("playground", None, "serve the browser playground at /playground/ (a page to play scripts with a wallet)"),
    ]
    optParameters = [
        logs.LOG_LEVEL_OPTION,
        _setting("api", "the contract of clients that ask for none (a WebSocket subprotocol): 'gateway' (ours), "
                 "'circles' (the original circles server's: play answers a string, errors -32000..-32002) or 'hero' "
                 "(its later generation's: fetch_nonce answers a string, authenticate true)", _api),
        _setting("port", f"TCP port to listen on (default {DEFAULT_PLAIN_PORT}, or {DEFAULT_TLS_PORT} with TLS)", int,
                 short="p"),
        _setting("interface", "address to bind (default: all)"),
        _setting("tls-ciphers", "OpenSSL cipher string for TLS 1.2 (default: Mozilla's intermediate "
                 "profile, ECDHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3 suites are OpenSSL's)"),
        _setting("nonce-ttl", "seconds a nonce stays valid", positive(float)),
        _setting("max-message-size", "largest WebSocket message accepted, in bytes", positive(int)),
        _setting("max-fragments", "frames one WebSocket message may come in (a first frame and its continuation "
                 "frames), beyond which the connection is closed with 1009 (0: no limit)", at_least_zero(int)),
        ("processes", None, 1, "server processes sharing the port (use one per core); they share state only "
         "through Redis, stop together, and are one server to watch: one log (each line with its process "
         "and pid), one /metrics for all, /ready 503 while one is down", positive(int)),
        _setting("max-batch", "most requests in one JSON-RPC batch", positive(int)),
        _setting("rate-limit", "JSON-RPC requests per second per connection, beyond which -32006 (0: no limit)",
                 at_least_zero(float)),
        _setting("rate-burst", "requests a connection may save up (default: twice --rate-limit)", positive(float)),
        _setting("max-plays", "plays one connection may have waiting for their result, beyond which "
                 "-32006 (0: no limit)", at_least_zero(int)),
        _setting("slow-reader-timeout", "seconds a connection may leave more than twice --max-message-size of "
                 "replies unread (its later play replies past that are answered -32007) before it is closed "
                 "(0: never)", at_least_zero(float)),
        _setting("max-script-size", "largest script a play may carry, in bytes (UTF-8), beyond which -32006 and "
                 "nothing is queued (the default is the tiny engine's own limit)", positive(int)),
        _setting("max-nonces", "live nonces one connection may hold", positive(int)),
        _setting("max-connections", "open WebSocket connections (0: no limit)", at_least_zero(int)),
        _setting("max-connections-per-ip", "open WebSocket connections from one address, an IPv6 one by its /64 "
                 "(0: no limit; behind a proxy all share one)", at_least_zero(int)),
        _setting("max-pending-per-ip", "connections from one address (an IPv6 /64) that have not sent their "
                 "whole request head yet (0: no limit)", at_least_zero(int)),
        _setting("fd-reserve", "file descriptors below the process's limit (RLIMIT_NOFILE) kept free: "
                 "past the rest, new connections are closed at once", at_least_zero(int)),
        _setting("max-http-nonces-per-ip", "live nonces from GET /auth/nonce held by one address (an IPv6 /64), "
                 "counted by each server process for those it issued (they are kept in Redis, for all) "
                 "(0: no limit)", at_least_zero(int)),
        _setting("handshake-timeout", "seconds from connecting to an open WebSocket (or a whole HTTP request)",
                 positive(float)),
        _setting("idle-timeout", "seconds without a message before a connection is closed (0: never)",
                 at_least_zero(float)),
        _setting("ping-interval", "seconds between WebSocket pings that find dead peers (0: off)",
                 at_least_zero(float)),
        _setting("ping-timeout", "seconds after a ping within which its pong must come, else the peer is dropped "
                 "(a peer gone silent is found within --ping-interval plus this)", positive(float)),
        _setting("allowed-origins", "comma-separated browser Origin patterns allowed to connect, e.g. "
                 f"https://app.example.com,https://*.example.com,http://localhost:* (default: any). The rule: "
                 f"{ORIGIN_RULE}. A client sending no Origin is no browser page and is let in", _origins),
        _setting("metrics-listen", "Twisted endpoint serving /metrics alone, e.g. tcp:9100:interface=127.0.0.1 "
                 "(default: /metrics on the main port)"),
        _setting("drain-grace", "seconds the port keeps accepting after SIGTERM while /ready answers 503, so a "
                 "load balancer checking /ready moves traffic away first (skipped if nothing asked /ready)",
                 at_least_zero(float)),
        _setting("shutdown-grace", "seconds in-flight calls get to finish when the server stops (after "
                 "--drain-grace)", at_least_zero(float)),
        _setting("script-timeout", "seconds a play may take (a play's timeout may only lower it)", positive(float)),
        *redis_parameters("Redis shared with the workers: redis://[user:password@]host:port/db, rediss://..., "
                          "unix:///path?db=N, redis+sentinel://host:26379,host:26380,.../MASTER_NAME/db", "a private redis-server in --state-dir",
                          "directory of the private Redis (its socket is STATE_DIR/redis.sock, "
                          "where circles-worker looks too)"),
        ("redis-maxmemory", None, None, "maxmemory of the private Redis (no --redis-url), in bytes or as Redis "
         "writes it (256mb, 1gb; 0: none), with maxmemory-policy noeviction: a full Redis refuses plays (-32004) and "
         "webhooks (503) rather than grow (default: derived from the limits, at least 64 MiB, at most 1 GiB and a "
         "quarter of the machine's memory; docs/deployment.md)", memory_size),
        ("stripe-secret-file", None, None,
         f"file of Stripe webhook signing secrets, one per line, 'SECRET' or 'CIRCLE_PK SECRET' "
         f"(also ${webhook_secrets.STRIPE_ENV}, comma-separated, else ${webhook_secrets.STRIPE_ENVS[1]}; "
         f"neither: /webhooks/stripe is off)"),
        ("idenfy-secret-file", None, None,
         f"file of iDenfy webhook signing secrets, same format "
         f"(also ${webhook_secrets.IDENFY_ENV}, else ${webhook_secrets.IDENFY_ENVS[1]}; "
         f"neither: /webhooks/idenfy is off)"),
        ("stripe-script", None, None, "file with the script queued for each Stripe event (default: a call of "
         "on_stripe_event(CIRCLES_DATA))"),
        ("idenfy-script", None, None, "file with the script queued for each iDenfy callback (default: a call of "
         "on_idenfy_callback(CIRCLES_DATA))"),
        _setting("webhook-tolerance", "seconds a Stripe signature's timestamp may differ from now", positive(float)),
        _setting("max-request-body", "largest HTTP request body accepted on any route (the webhooks' included), "
                 "in bytes; larger ones are answered 413 as they arrive", _request_body),
        _setting("webhook-deadline", "seconds a queued webhook event may wait for a worker", positive(float)),
        _setting("webhook-dedupe-ttl", "seconds a webhook event is remembered, so a redelivery is not queued again",
                 positive(int)),
        _setting("webhook-replicas", "Redis replicas that must hold a webhook event's task before it is answered "
                 "200 (Redis WAIT; else 503 and the provider retries) (default: 1 with a redis+sentinel:// URL, "
                 "else 0)", at_least_zero(int)),
        _setting("webhook-replica-timeout", "seconds one Redis WAIT waits for --webhook-replicas to acknowledge "
                 "the webhook events written before it (concurrent events share WAITs: one may wait for the "
                 "rest of the WAIT in flight, then its own)", positive(float)),
        _setting("webhook-attempts", "runs a webhook event's task gets when the workers running it are lost "
                 "(then it waits in the dead-letter list: circles tasks dead-letter)", positive(int)),
        _setting("job-ttl", "seconds a job (the hero contract's create_job, run_job) lives from its creation, "
                 "whatever its status: then it is gone, its output with it", positive(float)),
        _setting("max-jobs-per-caller", "live jobs one key may have, beyond which create_job and run_job answer "
                 "-32006 (0: no limit)", at_least_zero(int)),
        _setting("max-running-jobs-per-caller", "jobs of one key running at once; the others started wait "
                 "their turn (0: no limit)", at_least_zero(int)),
        _setting("max-jobs", "live jobs of every key together (each keeps its script and output in Redis), beyond "
                 "which create_job and run_job answer -32006 (0: no limit)", at_least_zero(int)),
        _setting("worker-protocol", "how plays and webhook events reach the workers: 'circles' (ours, "
                 "docs/worker-protocol.md) or 'hero' (the hero dispatcher's: hero:job:{id} hashes on "
                 "hero:work_queue:{circle}, which the ecosystem's Rust workers and circles-worker --worker-protocol "
                 "hero run; no live-worker check: a play with no worker waits for its timeout)",
                 worker_protocols.check),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["circles"] = []
        self["listen"] = []
        self["tls-cert"] = self["tls-key"] = None
        self.deprecated: set[str] = set()  # former option names given, warned about once logging is up

    def opt_circle(self, pubkey: str) -> None:
        """circle to serve, as its public key in hex (repeatable; default: any); PK:FILE also names an init script, run once in the circle when its first worker comes up (README, "Init scripts"); -c is -k too, as the original launcher spelled it"""  # noqa: E501
        self["circles"].append(pubkey)

    # Both letters; the help shows the one named last.
    opt_c = opt_k = opt_circle

    def _tls_file(self, name: str, path: str) -> None:
        if self[name] is not None and self[name] != path:
            what, rust = ("certificates", "cert") if name == "tls-cert" else ("keys", "key")
            raise usage.UsageError(f"two {what} given ({self[name]}, {path}): give one, with --{name} or --{rust}")
        self[name] = path

    def opt_tls_cert(self, path: str) -> None:
        """PEM certificate (chain) file: serve TLS (wss://) (also --cert)"""
        self._tls_file("tls-cert", path)

    def opt_tls_key(self, path: str) -> None:
        """PEM private key file (default: the key is in --tls-cert) (also --key)"""
        self._tls_file("tls-key", path)

    def opt_cert(self, path: str) -> None:
        """--tls-cert, by the Rust server's name"""
        self._tls_file("tls-cert", path)

    def opt_key(self, path: str) -> None:
        """--tls-key, by the Rust server's name"""
        self._tls_file("tls-key", path)

    def opt_version(self) -> None:
        """print circles' version (and Twisted's and Python's) and exit"""
        print_version()

    def opt_listen(self, description: str) -> None:
        """Twisted endpoint to listen on, e.g. tcp:8080 or ssl:8443:privateKey=k.pem:certKey=c.pem (repeatable; overrides --port)"""
        self["listen"].append(description)

    def opt_webhook_max_body(self, value: str) -> None:
        """deprecated synonym of --max-request-body, its former name (the limit bounds every route)"""
        try:
            self["max-request-body"] = _request_body(value)
        except ValueError as e:  # as usage.Options words it for --max-request-body
            raise usage.UsageError(f"Parameter type enforcement failed: {e}") from None
        self.deprecated.add("webhook-max-body")

    def parseOptions(self, options=None) -> None:
        # Kept for --processes, which starts the other processes with the same options.
        self.argv = list(options) if options is not None else []
        super().parseOptions(options)

    def postOptions(self) -> None:
        if self["processes"] > 1 and (self["listen"] or self["metrics-listen"]):
            # Every process would bind them: the second fails (address in use) and dies.
            raise usage.UsageError("--processes shares --port (and --tls-cert) between processes; "
                                   "it cannot share --listen or --metrics-listen endpoints")
        if self["tls"] and not self["tls-cert"]:
            raise usage.UsageError("--tls needs the certificate to serve: --cert FILE (or --tls-cert FILE), and "
                                   "--key FILE unless the key is in it (python -m circles.tryout.devcert DIR makes "
                                   "a development one)")
        if self["tls-key"] and not self["tls-cert"]:
            raise usage.UsageError("--tls-key needs --tls-cert (--key needs --cert)")
        # Bad files, keys and a missing redis-server are not usage mistakes: they get one line
        # saying what is wrong (SystemExit), not the help text (UsageError).
        if self["tls-ciphers"] is not None:
            try:
                tls.tls12_ciphers(self["tls-ciphers"])
            except tls.TLSError as e:
                raise SystemExit(f"circles: {e}") from None
        for description in self["listen"] + ([self["metrics-listen"]] if self["metrics-listen"] else []):
            try:
                endpoint_from_string(global_reactor, description, self["tls-ciphers"])
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"{description!r} is not a valid endpoint: {e}") from None
            except tls.TLSError as e:
                raise SystemExit(f"circles: {description}: {e}") from None
        dotenv = read_dotenv()  # the working directory's .env: below the environment, never over it
        try:
            redis = choose_redis(self, global_reactor, dotenv)
        except InvalidRedisURL as e:  # an ssl_ca_certs file that cannot be used
            raise SystemExit(f"circles: --redis-url: {e}") from None
        if redis.private:
            try:
                find_redis_server()
                refuse_a_state_dir_in_use(redis.address.path)  # type: ignore[arg-type]  # a private Redis's socket
            except EmbeddedRedisError as e:
                raise SystemExit(f"circles: {e}") from None
        try:
            tls_options = (tls.load(self["tls-cert"], self["tls-key"], self["tls-ciphers"])
                           if self["tls-cert"] else None)
        except tls.TLSError as e:
            raise SystemExit(f"circles: {e}") from None
        # Where the Redis URL and the secrets came from, for makeService to log (never a value).
        self.sources = [redis.log_line()]
        # Warned about once logging is up.
        self.maxmemory_ignored = self["redis-maxmemory"] is not None and not redis.private
        try:
            secrets = {}
            for provider, names in (("Stripe", webhook_secrets.STRIPE_ENVS), ("iDenfy", webhook_secrets.IDENFY_ENVS)):
                value, source, ignored = from_environment(names, dotenv=dotenv)
                path = self[f"{provider.lower()}-secret-file"]
                secrets[provider] = webhook_secrets.load(value, path)
                if source is not None:
                    self.sources.append(describe_source(f"{provider} webhook secrets", source, ignored))
                if path is not None:
                    self.sources.append(describe_source(f"{provider} webhook secrets", f"--{provider.lower()}-secret-file"))
            stripe_secrets, idenfy_secrets = secrets["Stripe"], secrets["iDenfy"]
        except webhook_secrets.SecretsError as e:
            raise SystemExit(f"circles: webhook secrets: {e}") from None
        scripts = {name: _read_script(self[f"{name}-script"], f"--{name}-script") for name in ("stripe", "idenfy")}
        try:
            circles, init_scripts = parse_circles(self["circles"], self["max-script-size"])
        except InitScriptError as e:
            raise SystemExit(f"circles: -k/--circle: {e}") from None
        try:
            self.config = Config(
                **{field: _config_value(self, option) for option, field in CONFIG_FIELDS.items()},
                circles=circles,
                init_scripts=init_scripts,
                listen=tuple(self["listen"]),
                reuse_port=self["reuse-port"] or self["processes"] > 1,
                tls=tls_options,
                redis_url=redis.url,
                state_dir=self["state-dir"],
                redis_maxmemory=self["redis-maxmemory"],
                stripe_secrets=stripe_secrets,
                idenfy_secrets=idenfy_secrets,
                stripe_script=scripts["stripe"],
                idenfy_script=scripts["idenfy"],
            )
        except ValueError as e:
            raise SystemExit(f"circles: -k/--circle: {e}") from None


class CannotStart(Exception):
    """Start-up failed for a reason the operator can fix (a port in use): ``str()`` says it."""


def _one_line_for_cannot_start(kind, error, tb, _previous=sys.excepthook) -> None:
    """What the interpreter prints for an exception nobody caught: for :class:`CannotStart`,
    one line on the process's stderr (twistd has sent ``sys.stderr`` to the log) and no
    traceback; the exit status is 1 as for any uncaught exception."""
    if isinstance(error, CannotStart):
        stderr: Any = sys.__stderr__  # None only in an interpreter with no stderr at start
        stderr.write(f"circles: {error}\n")
        stderr.flush()
        return
    _previous(kind, error, tb)


class StartOrExit(MultiService):
    """The service twistd runs: a port that cannot be bound (in use, not allowed) or a private
    Redis that cannot start (its directory) ends start-up with one line on stderr and exit status
    1, where twistd would print a traceback. (The log has a port's line too:
    :class:`~circles.service.ListeningService` writes it.)

    It raises :class:`CannotStart`, an exception, not ``SystemExit``: twistd catches exceptions
    from starting the application to remove its PID file and, when it runs as a daemon, to tell
    the waiting parent ("An error has occurred: ..."). The exception then reaches the
    interpreter, whose hook prints its one line.
    """

    def privilegedStartService(self) -> None:
        # The ports are bound here, before twistd drops privileges (--uid): ListeningService.
        self._or_exit(super().privilegedStartService)

    def startService(self) -> None:
        self._or_exit(super().startService)

    def _or_exit(self, start: Callable[[], None]) -> None:
        try:
            start()
        except (CannotListenError, EmbeddedRedisError) as e:
            if isinstance(e, EmbeddedRedisError):
                log.error("{error}", error=str(e))
            sys.excepthook = _one_line_for_cannot_start
            raise CannotStart(cannot_listen(e) if isinstance(e, CannotListenError) else str(e)) from None


def makeService(config: Options, reactor=global_reactor):
    logs.set_level(config["log-level"])
    for former in sorted(config.deprecated):
        log.warn("--{former} is deprecated: use --{option}", former=former, option=DEPRECATED[former])
    for line in getattr(config, "sources", ()):
        log.info("configuration: {source}", source=line)
    if getattr(config, "maxmemory_ignored", False):
        log.warn("--redis-maxmemory is for the private Redis only: ignored with a Redis URL "
                 "(set maxmemory on that Redis; docs/deployment.md says how to size it)")
    root = StartOrExit()
    try:
        service = _make_service(config, reactor)
    except EmbeddedRedisError as e:  # before twistd sends stderr to the log: a plain exit says it
        raise SystemExit(f"circles: {e}") from None
    service.setServiceParent(root)
    return root


def _make_service(config: Options, reactor):
    service = CirclesService(config.config, reactor=reactor)
    member = processes.member_from_environment()
    if config["processes"] == 1 and member is None:
        return service
    group = MultiService()
    service.setServiceParent(group)
    if member is not None:  # one of the others of a first process's --processes
        number, count, directory, generation = member
        siblings.join(service, number, count, directory, reactor, generation=generation).setServiceParent(group)
        return group
    # Every event of this process carries its pid and number too (circles.common.logs.ProcessTags): from
    # before twistd begins logging to its last line ("Server Shut Down."), so for good.
    logs.ProcessTags(1).start()
    # This process listens first (a port 0 becomes a real one), then starts the others on it;
    # they stop first, while the private Redis (ours) still runs for them.
    argv = child_argv(config, config.argv)
    if service.embedded_redis is not None:
        # The children queue their plays in it too: room for all the processes' plays in flight.
        service.embedded_redis.maxmemory = config.config.private_redis_maxmemory(config["processes"])
        argv += ["--redis-url", f"unix://{service.embedded_redis.address.path}"]
    # The processes' sockets (circles.server.processes.siblings), in a directory named now and made (0700) as the
    # service starts: after twistd's --uid, so that the user the processes run as owns it.
    directory = os.path.join(tempfile.gettempdir(), f"circles-{secrets.token_hex(8)}")
    siblings.join(service, 1, config["processes"], directory, reactor, remove=True).setServiceParent(group)
    ServerProcesses(reactor, config["processes"] - 1, argv, service.when_listening,
                    stop_timeout=config.config.drain_grace + config.config.shutdown_grace + 10, directory=directory,
                    backlog=LISTEN_BACKLOG).setServiceParent(group)
    return group


def child_argv(options: usage.Options, argv: list) -> list:
    """``argv`` as the other server processes get it: every option under its full (and current)
    name, and ``--processes`` replaced by ``--processes=1``, so a child never starts processes of
    its own.

    Built from getopt's parse (the one ``usage.Options`` does), not by matching the text the user
    typed: getopt takes any unique prefix (``--proc 2``), ``--processes=2`` and ``--processes 2``
    alike. A circle's init script (``-k PK:FILE``) is the first process's alone: the others get
    ``--circle=PK``.
    """
    pairs, rest = getopt.getopt(argv, options.shortOpt, options.longOpt)
    parameters = {name[:-1] for name in options.longOpt if name.endswith("=")}
    kept = []
    for opt, value in pairs:
        name = options.synonyms[opt.lstrip("-")]
        name = DEPRECATED.get(name, name)
        if name == "processes":
            continue
        if name == "circle":
            value = split_circle(value)[0]
        kept.append(f"--{name}={value}" if name in parameters else f"--{name}")
    return kept + ["--processes=1", *rest]
